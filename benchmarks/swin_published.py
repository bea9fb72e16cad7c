"""Benchmark: the published Swins (224 px) on a CPU Swin table, and what halving their predicted latency costs.

No trained weights are needed: the question is what a latency target does to the architecture. For each table
family (``swin_tiny``'s widths, which ``swin_small`` shares with deeper stage 2; and ``swin_base``'s), a coarse
Swin space is written (nvit's derived per-stage grids, every other width kept, the endpoints always) and
profiled with ONNX Runtime on this machine's CPU (its calibration and held-out self-check included). Then:

* the dense models' predicted latency and each stage's share of it;
* uniform width (every gate scaled by one factor, down to the largest factor the target allows) to 0.5 of the
  dense predicted latency: its params, GMACs and stage widths;
* the FLOPs stand-in (the same uniform scaling to half the dense GMACs): what the table predicts it saves;
* every dense and halved model measured in one session (``measure``), so the table's predictions of these
  large models, and the speedups, are checked against the clock.

``measure`` writes ``measured.json`` and keeps the previous session as ``measured_<UTC>.json``; the report lists
every earlier one.

Stages (each cached in --work, resumable; ``profile`` and ``measure`` time things: run them alone, under the lock):
    python benchmarks/swin_published.py space   --work W
    python benchmarks/swin_published.py profile --work W   # W/<family>.swinlut (nvit profile --space)
    python benchmarks/swin_published.py measure --work W
    python benchmarks/swin_published.py report  --work W --out results/swin_published.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

#: Table family → the published Swins it prices (the family's own first).
FAMILIES = {"swin_tiny": ("swin_tiny", "swin_small"), "swin_base": ("swin_base",)}
TARGET_FRACTION = 0.5
CALIBRATION_MODELS = 5
CHECK_MODELS = 4
#: Each part's sampling budget: a 224-px Swin's ~530 parts per table at nvit's 2 s would take about an hour.
TIME_CAP_S = 0.8


def log(msg: str) -> None:
    print(f"[swin_published {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def thinned(values: Sequence[int]) -> tuple[int, ...]:
    """Every other value, the first and the last always kept."""
    kept = list(values[::2])
    if kept[-1] != values[-1]:
        kept.append(values[-1])
    return tuple(kept)


def coarse_space(name: str) -> Any:
    from nvit.profiler.swin_space import derived_swin_space
    from nvit.swin import swin_preset

    derived = derived_swin_space(swin_preset(name))
    stages = tuple(replace(g, embed_dims=thinned(g.embed_dims), heads=thinned(g.heads), qk_dims=thinned(g.qk_dims),
                           v_dims=thinned(g.v_dims), mlp_dims=thinned(g.mlp_dims)) for g in derived.stages)
    return replace(derived, stages=stages, name=f"{name}-coarse")


def space_stage(args: argparse.Namespace) -> None:
    from nvit.profiler.space import save_space

    args.work.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        space = coarse_space(family)
        save_space(space, args.work / f"{family}.space.json")
        log(f"{family}: {len(space.configs())} configurations ({space.counts()})")


def profile_stage(args: argparse.Namespace) -> None:
    for family in FAMILIES:
        out = args.work / f"{family}.swinlut"
        if out.is_dir():
            log(f"{out} exists; skipped")
            continue
        cmd = [sys.executable, "-m", "nvit", "profile", "--space", str(args.work / f"{family}.space.json"),
               "--out", str(out), "--calibrate", str(CALIBRATION_MODELS), "--check", str(CHECK_MODELS),
               "--passes", str(args.passes), "--backend-option", f'harness={{"time_cap_s": {args.time_cap_s}}}']
        log(" ".join(cmd[2:]))
        subprocess.run(cmd, check=True)


def halved(name: str, predictor: Any) -> dict[str, Any]:
    """The dense model, its uniform scaling to half the predicted latency and to half the GMACs."""
    import prune_methods as pm

    from nvit.lut.base import SwinFlopsPredictor
    from nvit.pruning.groups import GroupLayout
    from nvit.swin import swin_preset

    spec = swin_preset(name)
    layout = GroupLayout(spec, group_size=8)
    zeros = np.zeros(layout.num_units)
    dense_ms = predictor.predict_ms(spec)
    latency = pm.uniform_to_target(layout, zeros, predictor, TARGET_FRACTION * dense_ms).spec()
    flops = pm.uniform_to_target(layout, zeros, SwinFlopsPredictor(spec, 1.0), TARGET_FRACTION).spec()
    return {"dense": replace(spec, name=name), "latency_half": replace(latency, name=f"{name}/latency_half"),
            "flops_half": replace(flops, name=f"{name}/flops_half")}


def measure_stage(args: argparse.Namespace) -> None:
    from nvit.fileio import atomic_write_text
    from nvit.lut import load_table, predictor_for
    from nvit.models.swin import build_swin
    from nvit.validation.compare import Variant, compare_with_table

    out: dict[str, Any] = {}
    for family, names in FAMILIES.items():
        table = load_table(args.work / f"{family}.swinlut")
        predictor = predictor_for(table)
        specs = [s for name in names for s in halved(name, predictor).values()]
        variants = [Variant(s.name, s, build_swin(s, seed=0).eval()) for s in specs]
        log(f"{family}: measuring {len(variants)} models in one session")
        started = time.perf_counter()
        report = compare_with_table(table, variants[0], variants[1:], passes=2)
        context = {k: report.context.get(k) for k in ("conditions", "backend", "versions")}
        out[family] = {"seconds": time.perf_counter() - started, "context": context,
                       "models": {r.name: {"measured_ms": r.measured_ms, "predicted_ms": r.predicted_ms,
                                           "p10_ms": r.measured_ms_p10, "p90_ms": r.measured_ms_p90}
                                  for r in report.results}}
        log(f"{family}: measured in {out[family]['seconds']:.0f} s")
    from sessions import keep_earlier_session

    keep_earlier_session(args.work / "measured.json")
    atomic_write_text(args.work / "measured.json", json.dumps(out, indent=1) + "\n")


def _stage_shares(predictor: Any, spec: Any) -> list[float]:
    whole_ms = predictor.predict_ms(spec)
    return [float(s / whole_ms) for s in predictor.stage_latencies_ms(spec)]


def report_stage(args: argparse.Namespace) -> None:
    from nvit import __version__
    from nvit.fileio import atomic_write_text
    from nvit.lut import load_table, predictor_for

    measured_path = args.work / "measured.json"
    measured = json.loads(measured_path.read_text()) if measured_path.is_file() else {}
    doc: dict[str, Any] = {"benchmark": "swin_published", "nvit_version": __version__,
                           "machine": {"cpu": platform.processor() or platform.machine(), "python":
                                       platform.python_version()},
                           "date": time.strftime("%Y-%m-%d"), "target_fraction": TARGET_FRACTION, "tables": {},
                           "models": {}}
    for family, names in FAMILIES.items():
        table = load_table(args.work / f"{family}.swinlut")
        predictor = predictor_for(table)
        meta = table.meta
        check = meta.self_check
        doc["tables"][family] = {
            "rows": len(table), "counts": table.counts(), "profile_seconds": meta.profile_seconds_total,
            "calibration": None if meta.calibration is None else {
                "method": meta.calibration.method, "scale": meta.calibration.scale,
                "offset_ms": meta.calibration.offset_ms, "per_block_ms": meta.calibration.per_block_ms},
            "self_check": None if check is None else {"mape_pct": check.mape_pct, "bias_pct": check.bias_pct,
                                                      "max_abs_pct": check.max_abs_pct, "models": len(check.models)},
            "sentinel_max_drift": max((abs(s["drift"]) for s in meta.sentinel), default=0.0),
            "conditions": meta.conditions.to_dict() if hasattr(meta.conditions, "to_dict") else meta.conditions,
        }
        times = measured.get(family, {}).get("models", {})
        for name in names:
            specs = halved(name, predictor)
            dense_ms = predictor.predict_ms(specs["dense"])
            row: dict[str, Any] = {"table": family, "stage_shares_dense": _stage_shares(predictor, specs["dense"])}
            for kind, spec in specs.items():
                predicted_ms = predictor.predict_ms(spec)
                entry = {"params_M": spec.num_params() / 1e6, "gmacs": spec.macs() / 1e9,
                         "embed_dims": [st.embed_dim for st in spec.stages], "predicted_ms": predicted_ms,
                         "predicted_fraction": predicted_ms / dense_ms}
                if spec.name in times:
                    entry.update(times[spec.name])
                    entry["error_pct"] = 100 * (entry["predicted_ms"] / entry["measured_ms"] - 1)
                row[kind] = entry
            dense_measured = row["dense"].get("measured_ms")
            for kind in ("latency_half", "flops_half"):
                if dense_measured and "measured_ms" in row[kind]:
                    row[kind]["measured_fraction"] = row[kind]["measured_ms"] / dense_measured
            doc["models"][name] = row
            log(f"{name}: dense {row['dense']['params_M']:.1f} M params, {dense_ms:.1f} ms predicted; at "
                f"{TARGET_FRACTION:g} of it {row['latency_half']['params_M']:.1f} M; FLOPs-half predicted at "
                f"{row['flops_half']['predicted_fraction']:.2f} of dense")
    doc["measured"] = {k: {"seconds": v["seconds"], "conditions": (v["context"].get("conditions") or {})}
                       for k, v in measured.items()}
    doc["earlier_sessions"] = [  # kept as measured_<name>.json before measuring again: every model's timing
        {"file": path.name, **{family: {"conditions": (v["context"].get("conditions") or {}).get("verdict"),
                                        "models_ms": {n: m["measured_ms"] for n, m in v["models"].items()}}
                               for family, v in json.loads(path.read_text()).items()}}
        for path in sorted(args.work.glob("measured_*.json"))]
    atomic_write_text(args.out, json.dumps(doc, indent=1, default=str) + "\n")
    log(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("space", "profile", "measure", "report"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("results/swin_published.json"))
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--time-cap-s", type=float, default=TIME_CAP_S,
                        help="sampling budget of one part over its repeats (nvit's CPU default: 2 s)")
    args = parser.parse_args()
    {"space": space_stage, "profile": profile_stage, "measure": measure_stage, "report": report_stage}[args.stage](
        args)


if __name__ == "__main__":
    main()
