"""Benchmark: a small Swin on Fashion-MNIST through nvit (table checked on held-out shapes, then §2's protocol).

``swin_fashion`` (28 px, patch 2, window 7: 14² tokens in four shifting windows, then 7² in one; widths 32 and 64)
is trained, profiled into a CPU Swin table (ONNX Runtime, one thread) whose self-check reports the error on
held-out Swins (MAPE and bias, pruned shapes apart), then pruned with §2's protocol at a smaller scale: nvit's
default ranking (``knapsack``), saliency alone and uniform width (every gate scaled by one factor, its most
salient units kept), to three target ratios of the dense predicted latency, 2 seeds; every variant fine-tuned
with KD from the dense model so each (method, target) gets the same training steps after the base; all measured
in one interleaved session and compared at equal *measured* latency (:mod:`prune_stats`). A last stage states
the analytic sizes of ``swin_tiny/small/base``.

Stages (each cached in --work, resumable; ``profile`` and ``measure`` time things — run them alone):
    python benchmarks/swin_fashion.py base    --work W     # W/base: nvit train --arch swin_fashion
    python benchmarks/swin_fashion.py profile --work W     # W/lut.swinlut: nvit profile --arch W/base
    python benchmarks/swin_fashion.py run     --work W
    python benchmarks/swin_fashion.py measure --work W
    python benchmarks/swin_fashion.py report  --work W --out results/swin_fashion.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import prune_fashion as pf

SETTINGS = pf.Settings(targets=(0.8, 0.6, 0.45), seeds=(0, 1), lambdas=(), interval=10, pace=0.05, total_steps=400)
METHODS = ("knapsack", "saliency", "uniform")
BASE_EPOCHS = 12
SALIENCY_BATCHES = 8


def log(msg: str) -> None:
    print(f"[swin_fashion {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def nvit(*argv: str) -> None:
    cmd = [sys.executable, "-m", "nvit", *argv]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def base_stage(args: argparse.Namespace) -> None:
    if (args.work / "base" / "arch.json").is_file():
        log("base already trained")
        return
    nvit("train", "--arch", "swin_fashion", "--data", "fashion-mnist", "--epochs", str(args.epochs), "--batch-size",
         "128", "--lr", "1e-3", "--warmup-epochs", "1", "--out", str(args.work / "base"))


def profile_stage(args: argparse.Namespace) -> None:
    nvit("profile", "--arch", str(args.work / "base"), "--backend", "onnxruntime", "--threads", "1", "--passes", "2",
         "--calibrate", "8", "--check", "10", "--out", str(args.work / "lut.swinlut"))


def salient_scores(ctx: pf.Context, layout: Any, seed: int) -> np.ndarray:
    """Per unit, the mean squared ``Σ w ∂L/∂w`` over a few batches at the dense model (what stays in uniform)."""
    from nvit.models import load_variant
    from nvit.pruning.saliency import gate_unit_sums
    from nvit.training.batches import StepBatches

    model = load_variant(ctx.base_dir)
    model.enable_gates()
    model.train()
    batches, loss = StepBatches(ctx.train, batch_size=ctx.s.batch_size, seed=seed).batches(0), ctx.loss()
    total = np.zeros(layout.num_units)
    for _ in range(SALIENCY_BATCHES):
        images, labels = next(batches)
        model.zero_grad(set_to_none=True)
        loss(images, model(images), labels).total.backward()
        total += gate_unit_sums(model, layout).numpy() ** 2
    return total


def uniform_variants(ctx: pf.Context, seed: int, folder: Path) -> tuple[list[tuple[float, Any, int]], list]:
    import prune_methods as pm

    from nvit.models import load_variant
    from nvit.models.checkpoint import slice_any
    from nvit.pruning.limits import pruning_layout

    layout = pruning_layout(ctx.base.spec, pf.prune_config(ctx.s, "saliency", seed), ctx.predictor)
    scores = salient_scores(ctx, layout, seed)
    dense_ms = ctx.predictor.predict_ms(ctx.base.spec)
    out = []
    for ratio in ctx.s.targets:
        state = pm.uniform_to_target(layout, scores, ctx.predictor, ratio * dense_ms)
        model = load_variant(ctx.base_dir)
        state.apply(model)
        out.append((ratio, slice_any(model), 0))
    return out, []


def run_stage(args: argparse.Namespace) -> None:
    pf.pruned_variants = _with_swin_uniform(pf.pruned_variants)
    for method in METHODS:
        for seed in args.settings.seeds:
            pf.run_one(str(args.work / "base"), str(args.work / "lut.swinlut"), args.settings, str(args.work),
                       method, seed)


def _with_swin_uniform(original: Any) -> Any:
    def pruned_variants(ctx: pf.Context, method: str, seed: int, folder: Path) -> Any:
        return uniform_variants(ctx, seed, folder) if method == "uniform" else original(ctx, method, seed, folder)
    return pruned_variants


def measure_stage(args: argparse.Namespace) -> None:
    ns = argparse.Namespace(work=args.work, base=args.work / "base", lut=args.work / "lut.swinlut")
    pf.measure_stage(ns, args.settings)


def sizes() -> dict[str, Any]:
    """The published Swins' analytic sizes, and their params once every width is scaled by one factor until the
    FLOPs proxy reaches half the dense model's (a stand-in: a CPU table of a 224-px Swin is out of this budget)."""
    import prune_methods as pm

    from nvit.lut.base import SwinFlopsPredictor
    from nvit.pruning.groups import GroupLayout
    from nvit.swin import swin_preset

    out = {}
    for name in ("swin_tiny", "swin_small", "swin_base"):
        spec = swin_preset(name)
        layout = GroupLayout(spec, group_size=8)
        half = pm.uniform_to_target(layout, np.zeros(layout.num_units), SwinFlopsPredictor(spec, 1.0), 0.5).spec()
        out[name] = {"params_M": spec.num_params() / 1e6, "gmacs": spec.macs() / 1e9,
                     "uniform_half_flops": {"params_M": half.num_params() / 1e6, "gmacs": half.macs() / 1e9,
                                            "embed_dims": [st.embed_dim for st in half.stages]}}
    return out


def report_stage(args: argparse.Namespace) -> None:
    import prune_stats as st

    from nvit import __version__
    from nvit.fileio import atomic_write_text
    from nvit.lut import load_table

    s, work = args.settings, args.work
    runs = pf.load_rows(work)
    sessions = measured_sessions(work)
    judged = judged_sessions(work, runs)
    files = [j["file"] for j in judged]
    if args.session and args.session not in files:
        raise SystemExit(f"no measuring session {args.session!r} in {work} (sessions: {', '.join(files)})")
    chosen = files.index(args.session) if args.session else None  # one session, its models measured together

    def pick(times: list[float]) -> float:
        return min(times) if chosen is None else times[chosen]  # else each model at its fastest session

    measured = {name: {**first, "measured_ms": pick([sess[name]["measured_ms"] for sess in sessions]),
                       "sessions_ms": [sess[name]["measured_ms"] for sess in sessions]}
                for name, first in sessions[0].items()}
    comparison, comparison_predicted = {}, {}
    for stage in ("after", "before"):
        for out, key in ((comparison, "measured_ms"), (comparison_predicted, "predicted_ms")):
            curves = {m: {seed: st.curve([(measured[f"{m}/s{seed}/{r['target_ratio']:g}"][key],
                                           r[f"test_{stage}"]) for r in runs[(m, seed)]["rows"]])
                          for seed in s.seeds if (m, seed) in runs} for m in METHODS}
            out[stage] = st.compare_methods({k: v for k, v in curves.items() if v}, "saliency")
    rows = [dict(r, measured_ms=measured[f"{m}/s{seed}/{r['target_ratio']:g}"]["measured_ms"])
            for (m, seed), doc in runs.items() for r in doc["rows"]]
    table = load_table(work / "lut.swinlut")
    check = table.meta.self_check
    ns = argparse.Namespace(work=work, base=work / "base", lut=work / "lut.swinlut")
    base = pf.load_base_eval(ns, s)
    doc = {"kind": "nvit.benchmark.swin_fashion", "version": 1, "nvit_version": __version__,
           "host": platform.node(), "settings": asdict(s), "methods": list(METHODS), "split": "test",
           "base": {**base, "measured_ms": measured["base"]["measured_ms"]},
           "table": {"rows": len(table), "profile_seconds": table.meta.profile_seconds_total,
                     "conditions": table.meta.conditions, "calibration": table.meta.calibration.to_dict(),
                     "self_check": check.to_dict() if check else None},
           "comparison": comparison, "comparison_at_predicted_latency": comparison_predicted, "rows": rows,
           "measured_sessions": len(sessions), "sessions": judged, "session_used": args.session or "fastest of each",
           "measured": measured,
           "cpu_seconds": {f"{m}/s{seed}": doc["cpu_seconds"] for (m, seed), doc in runs.items()},
           "measure_seconds": [json.loads(p.read_text())["seconds"] for p in measured_files(work)], "sizes": sizes()}
    atomic_write_text(args.out, json.dumps(doc, indent=1, default=float) + "\n")
    print(st.markdown(doc))
    print("At equal *predicted* latency (the table's self-check on held-out Swins bounds its error):\n")
    print(st.markdown({**doc, "comparison": comparison_predicted}).split("\n\n")[1])
    print(variants_markdown(rows))
    log(f"wrote {args.out}")


def measured_files(work: Path) -> list[Path]:
    """Every measuring session's file: ``measured.json`` and the earlier ones ``measure`` kept as ``measured_*.json``
    (:mod:`sessions`)."""
    return sorted(work.glob("measured_*.json")) + ([work / "measured.json"] if (work / "measured.json").is_file()
                                                    else [])


def measured_sessions(work: Path) -> list[dict[str, Any]]:
    """Each session's models (measured and predicted ms); a model keeps its fastest session in the report, the
    rule the profiler follows for whole models (a busy spell only ever adds time)."""
    return [json.loads(p.read_text())["models"] for p in measured_files(work)]


def judged_sessions(work: Path, runs: dict[Any, Any]) -> list[dict[str, Any]]:
    """Each session as the measurements themselves judge it: the machine's verdict while it ran, and every group of
    variants with one architecture (seeds that landed on the same widths) whose timings in it differ by more than
    5% (:func:`nvit.validation.trust.twin_disagreements`)."""
    from types import SimpleNamespace

    from nvit.validation.trust import architecture_key, twin_disagreements

    archs = {f"{m}/s{seed}/{r['target_ratio']:g}": r["arch"] for (m, seed), doc in runs.items() for r in doc["rows"]}
    out = []
    for path in measured_files(work):
        doc = json.loads(path.read_text())
        rows = [SimpleNamespace(name=name, arch=archs[name], measured_ms=m["measured_ms"], uncertainty_pct=0.0)
                for name, m in doc["models"].items() if name in archs]
        twins = twin_disagreements(rows)
        out.append({"file": path.name, "machine": (doc["context"].get("conditions") or {}).get("verdict"),
                    "twins": twins, "twin_groups": _groups_of_twins([architecture_key(r) for r in rows])})
    return out


def _groups_of_twins(keys: list[str | None]) -> int:
    return sum(1 for k in set(keys) if k is not None and keys.count(k) > 1)


def variants_markdown(rows: list[dict[str, Any]]) -> str:
    """Every variant: measured latency, params, per-stage widths and its test top-1 (per seed, not averaged)."""
    from nvit.swin import SwinSpec

    lines = ["| method | seed | target | predicted ms | measured ms | params k | stage widths | MLP widths | "
             "test top-1 before → after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], -r["target_ratio"], r["seed"])):
        spec = SwinSpec.from_dict(r["arch"])
        mlp = " / ".join(",".join(str(b.mlp_dim) for b in st.blocks) for st in spec.stages)
        lines.append(f"| {r['method']} | {r['seed']} | {r['target_ratio']:g} | {r['predicted_ms']:.4f} | "
                     f"{r['measured_ms']:.4f} | "
                     f"{r['params'] / 1e3:.1f} | {'/'.join(str(st.embed_dim) for st in spec.stages)} | {mlp} | "
                     f"{100 * r['test_before']:.1f} → {100 * r['test_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("base", "profile", "run", "measure", "report"))
    parser.add_argument("--work", type=Path, default=Path("bench-swin-fashion"))
    parser.add_argument("--out", type=Path, default=Path("results/swin_fashion.json"))
    parser.add_argument("--epochs", type=int, default=BASE_EPOCHS)
    parser.add_argument("--session", help="report: one measuring session's file (measured.json, measured_*.json) "
                        "instead of each model's fastest session")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.settings = pf.apply_overrides(replace(SETTINGS), args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    {"base": base_stage, "profile": profile_stage, "run": run_stage, "measure": measure_stage,
     "report": report_stage}[args.stage](args)


if __name__ == "__main__":
    main()
