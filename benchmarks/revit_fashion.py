"""Benchmark: do redistributed widths beat uniform widths at equal *measured* latency? (Fashion-MNIST, CPU)

Four designs at one latency, the mean measured latency of §2's pruned-and-fine-tuned ``nvit`` variants at
``target_ratio`` (from ``results/prune_fashion.json``, re-measured here in the same session):
- ``uniform``: §2's base shape (every share 1) at the embedding whose measured latency is nearest;
- ``published``: NViT's rule read as shares (:func:`nvit.redesign.published.published_shares`) on the same base;
- ``learned``: the rule fitted on §2's ``nvit`` variants (every seed, every target unless ``rule_ratios``;
  ``nvit arch redistribute``'s library path), on the same base;
- ``pruned``: §2's variants themselves (pruned from the trained base, then fine-tuned): the reference.
The first three are trained from scratch with §2's base recipe (AdamW, cosine, the ``auto`` augmentation,
``epochs`` each) for every seed; test top-1 is reported with 95% t-intervals, and per seed against uniform.

Stages (each cached in --work, resumable; ``scale`` and ``measure`` time models — run them alone, e.g. under
a lock on a shared machine):
    python benchmarks/revit_fashion.py scale --prune-results results/prune_fashion.json --work W
    python benchmarks/revit_fashion.py train --prune-results results/prune_fashion.json --work W --jobs 2
    python benchmarks/revit_fashion.py measure --prune-results results/prune_fashion.json --work W
    python benchmarks/revit_fashion.py report --prune-results results/prune_fashion.json --work W \\
        --out results/revit_fashion.json
``all`` runs the four in order. Smoke run (a minute, digits): ``--quick`` with a prune-results file of a
vit_test base (what the test suite does).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

DESIGNS = ("uniform", "published", "learned")


@dataclass(frozen=True)
class Settings:
    data: str = "fashion-mnist"
    target_ratio: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    embed_min: int = 16
    embed_max: int = 160
    embed_step: int = 8
    bandwidth: float = 0.15
    rule_ratios: tuple[float, ...] = ()  # the targets whose variants the learned rule is fitted on (empty: all)
    eval_batch: int = 500
    threads: int = 1
    passes: int = 2  # every model is timed this many times (each pass interleaved); the fastest pass is kept
    harness: dict[str, float] = field(default_factory=dict)  # overrides of the CPU timing protocol


QUICK = Settings(data="digits", seeds=(0, 1), epochs=1, batch_size=32, embed_min=16, embed_max=64, embed_step=16,
                 passes=1,
                 harness={"warmup_s": 0.01, "rewarm_s": 0.0, "min_samples": 3, "max_samples": 20,
                          "time_cap_s": 0.05, "repeats": 1})


def log(msg: str) -> None:
    print(f"[revit_fashion {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- designs --------------------------------------------------------------------------------------
def load_prune_results(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if doc.get("kind") != "nvit.benchmark.prune_fashion":
        raise SystemExit(f"{path} is not a prune_fashion result")
    return doc


def nvit_method(prune: dict[str, Any]) -> str:
    from prune_fashion import lam

    return f"latency_l{lam(float(prune['chosen_lambda']))}"


def reference_rows(prune: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    """§2's ``nvit`` variants at the target ratio, one per seed."""
    method = nvit_method(prune)
    rows = [r for r in prune["rows"] if r["method"] == method and abs(r["target_ratio"] - s.target_ratio) < 1e-9]
    if not rows:
        raise SystemExit(f"no {method} variants at ratio {s.target_ratio} in the prune results")
    return sorted(rows, key=lambda r: r["seed"])


def family_shares(prune: dict[str, Any], s: Settings) -> list[Any]:
    """§2's ``nvit`` variants the learned rule is fitted on, as width shares against the base."""
    from nvit.arch import ArchSpec
    from nvit.redesign.learned import Reference, Shape, variant_shares

    ref = Reference.of(ArchSpec.from_dict(prune["base"]["arch"]))
    method = nvit_method(prune)
    return [variant_shares(Shape.of(ArchSpec.from_dict(r["arch"]), f"{method}/s{r['seed']}/{r['target_ratio']:g}"),
                           ref) for r in prune["rows"] if r["method"] == method
            and (not s.rule_ratios or any(abs(r["target_ratio"] - x) < 1e-9 for x in s.rule_ratios))]


def rules(prune: dict[str, Any], s: Settings) -> tuple[Any, Any, dict[str, Any]]:
    """The base, its dense reference and the three rules (as shares over the base's depth)."""
    from nvit.arch import ArchSpec
    from nvit.redesign.learned import KINDS, Reference, Shares, fit_shares, relative_positions
    from nvit.redesign.published import published_shares

    base = ArchSpec.from_dict(prune["base"]["arch"])
    ref = Reference.of(base)
    family = family_shares(prune, s)
    uniform = Shares("uniform", tuple(relative_positions(base.depth).tolist()), {k: (1.0,) * base.depth for k in KINDS})
    return base, ref, {"uniform": uniform, "published": published_shares(base.depth),
                       "learned": fit_shares(family, base.depth, s.bandwidth)}


def design_spec(name: str, embed_dim: int, prune: dict[str, Any], s: Settings) -> Any:
    from nvit.redesign.learned import build_arch

    base, ref, by_name = rules(prune, s)
    return build_arch(by_name[name], ref, embed_dim, base, name=f"{name}_e{embed_dim}")


# ---- measuring --------------------------------------------------------------------------------------
def measure(specs: dict[str, Any], s: Settings, chunk: int = 6) -> dict[str, float]:
    """Median latency (ms) of whole models, onnxruntime CPU, batch 1, interleaved a few at a time; the fastest
    of ``passes`` passes (a stalled moment of a shared host costs one pass, not the model)."""
    from nvit.profiler.base import get_backend
    from nvit.profiler.harness import HarnessConfig
    from nvit.profiler.workloads import model_workload
    from nvit.vocab import DeviceKind, Precision

    options: dict[str, Any] = {"intra_op_threads": s.threads}
    if s.harness:
        options["harness"] = {**HarnessConfig.for_device(DeviceKind.CPU).to_dict(), **s.harness}
    out: dict[str, float] = {}
    names = list(specs)
    with get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP32, batch_size=1, **options) as b:
        for _ in range(s.passes):
            for i in range(0, len(names), chunk):
                part = names[i:i + chunk]
                stats = b.measure_many([model_workload(specs[n], 1, name=n) for n in part])
                for n, st in zip(part, stats, strict=True):
                    out[n] = min(out.get(n, float("inf")), st.latency_ms_median)
    return out


def scale_stage(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    """Every design at every candidate embedding and the reference variants, measured; the nearest chosen."""
    from nvit.arch import ArchSpec
    from nvit.errors import SpecError
    from nvit.fileio import atomic_write_text

    path = args.work / "scale.json"
    if path.is_file():
        return json.loads(path.read_text())
    prune = load_prune_results(args.prune_results)
    started = time.perf_counter()
    specs = {f"pruned/s{r['seed']}": ArchSpec.from_dict(r["arch"]) for r in reference_rows(prune, s)}
    for name in DESIGNS:
        for e in range(s.embed_min, s.embed_max + 1, s.embed_step):
            try:
                specs[f"{name}/{e}"] = design_spec(name, e, prune, s)
            except SpecError as exc:
                log(f"{name} at E={e} skipped: {exc}")
    log(f"measuring {len(specs)} models")
    ms = measure(specs, s)
    target = float(np.mean([v for k, v in ms.items() if k.startswith("pruned/")]))
    chosen = {}
    for name in DESIGNS:
        cands = {int(k.split("/")[1]): v for k, v in ms.items() if k.startswith(f"{name}/")}
        chosen[name] = min(cands, key=lambda e: (abs(cands[e] - target), e))
    doc = {"target_ms": target, "measured_ms": ms, "chosen_embed": chosen, "seconds": time.perf_counter() - started}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    log(f"target {target:.4f} ms; chosen embeddings {chosen}")
    return doc


# ---- training -----------------------------------------------------------------------------------------
def train_one(prune_path: str, s: Settings, work: str, name: str, embed_dim: int, seed: int) -> str:
    """Train one design from scratch; ``work/runs/NAME/seedN/result.json`` (resumable per epoch)."""
    import torch

    from nvit.data import build_dataset, build_loader
    from nvit.fileio import atomic_write_text
    from nvit.models.vit import build_model
    from nvit.training.distill import ClassificationLoss
    from nvit.training.fit import TrainConfig, fit, top1

    folder = Path(work) / "runs" / name / f"seed{seed}"
    result = folder / "result.json"
    if result.is_file():
        return str(result)
    torch.set_num_threads(1)
    started = time.process_time()
    spec = design_spec(name, embed_dim, load_prune_results(Path(prune_path)), s)
    model = build_model(spec, seed=seed)
    train_set = build_dataset(s.data, "train", spec, augment=True)
    config = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, min_lr=s.min_lr,
                         warmup_epochs=s.warmup_epochs, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    fit(model, build_loader(train_set, batch_size=s.batch_size, train=True, seed=seed), ClassificationLoss(), config,
        checkpoint_path=folder / "train.pt")
    model.eval()
    val = top1(model, build_dataset(s.data, "val", spec, augment=False), batch_size=s.eval_batch)
    test = None if s.data == "digits" else top1(model, build_dataset(s.data, "test", spec, augment=False),
                                                batch_size=s.eval_batch)
    doc = {"design": name, "seed": seed, "embed_dim": embed_dim, "arch": spec.to_dict(),
           "params": spec.num_params(), "macs": spec.macs(), "val": val, "test": test, "epochs": s.epochs,
           "cpu_seconds": time.process_time() - started}
    atomic_write_text(result, json.dumps(doc, indent=1) + "\n")
    (folder / "train.pt").unlink(missing_ok=True)
    log(f"{name} seed {seed}: val {val:.4f} in {doc['cpu_seconds']:.0f} CPU s")
    return str(result)


def train_stage(args: argparse.Namespace, s: Settings) -> None:
    chosen = scale_stage(args, s)["chosen_embed"]
    todo = [(n, seed) for n in DESIGNS for seed in s.seeds
            if not (args.work / "runs" / n / f"seed{seed}" / "result.json").is_file()]
    log(f"{len(todo)} trainings to do")
    if args.jobs <= 1:
        for n, seed in todo:
            train_one(str(args.prune_results), s, str(args.work), n, int(chosen[n]), seed)
        return
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        for f in [pool.submit(train_one, str(args.prune_results), s, str(args.work), n, int(chosen[n]), seed)
                  for n, seed in todo]:
            f.result()


def _worker_init() -> None:
    sys.path.insert(0, str(Path(__file__).parent))


def measure_stage(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    """The chosen designs and the reference variants again, in one interleaved session."""
    from nvit.arch import ArchSpec
    from nvit.fileio import atomic_write_text

    path = args.work / "measured.json"
    if path.is_file():
        return json.loads(path.read_text())
    prune = load_prune_results(args.prune_results)
    chosen = scale_stage(args, s)["chosen_embed"]
    specs = {f"pruned/s{r['seed']}": ArchSpec.from_dict(r["arch"]) for r in reference_rows(prune, s)}
    specs |= {n: design_spec(n, int(chosen[n]), prune, s) for n in DESIGNS}
    started = time.perf_counter()
    doc = {"measured_ms": measure(specs, s, chunk=len(specs)), "seconds": time.perf_counter() - started}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return doc


# ---- report ---------------------------------------------------------------------------------------------
def report_stage(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    import prune_stats as st

    from nvit import __version__
    from nvit.fileio import atomic_write_text

    prune = load_prune_results(args.prune_results)
    scale, measured = scale_stage(args, s), measure_stage(args, s)["measured_ms"]
    split = "val" if s.data == "digits" else "test"
    runs = {(n, seed): json.loads((args.work / "runs" / n / f"seed{seed}" / "result.json").read_text())
            for n in DESIGNS for seed in s.seeds}
    refs = {r["seed"]: r for r in reference_rows(prune, s)}
    designs = {}
    for n in DESIGNS:
        acc = [runs[(n, seed)][split] for seed in s.seeds]
        first = runs[(n, s.seeds[0])]
        designs[n] = {"embed_dim": first["embed_dim"], "arch": first["arch"], "params": first["params"],
                      "macs": first["macs"], "measured_ms": measured[n], "top1": acc, "mean": st.paired(acc).to_dict(),
                      "vs_uniform": st.paired([a - u for a, u in zip(acc, [runs[("uniform", sd)][split]
                                                                         for sd in s.seeds], strict=True)]).to_dict()}
    ref_acc = [refs[seed][f"{split}_after"] for seed in sorted(refs)]
    designs["pruned"] = {"measured_ms": float(np.mean([measured[f"pruned/s{sd}"] for sd in refs])),
                         "measured_ms_each": {str(sd): measured[f"pruned/s{sd}"] for sd in refs},
                         "archs": {str(sd): refs[sd]["arch"] for sd in refs}, "top1": ref_acc,
                         "mean": st.paired(ref_acc).to_dict(), "method": nvit_method(prune)}
    _, _, by_name = rules(prune, s)
    doc = {"kind": "nvit.benchmark.revit_fashion", "version": 1, "nvit_version": __version__, "host": platform.node(),
           "settings": asdict(s), "split": split, "target_ms": scale["target_ms"], "designs": designs,
           "shares": {n: r.to_dict() for n, r in by_name.items()}, "scale": scale,
           "cpu_seconds_training": sum(r["cpu_seconds"] for r in runs.values()),
           "measure_seconds": scale["seconds"] + measure_stage(args, s)["seconds"]}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    from nvit.plots import plot_shares

    figure = plot_shares(family_shares(prune, s), by_name["learned"], args.out.with_name(args.out.stem + "_shares.png"))
    print(markdown(doc))
    log(f"wrote {args.out} and {figure}")
    return doc


def markdown(doc: dict[str, Any]) -> str:
    def pct(p: dict[str, Any]) -> str:
        lo, hi = p["ci95"]
        ci = "" if lo != lo else f" [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        return f"{100 * p['mean']:.2f}{ci}"

    lines = [f"| design | E | params | measured ms | {doc['split']} top-1 % (95% CI) | vs uniform (points) |",
             "|---|---|---|---|---|---|"]
    for n, d in doc["designs"].items():
        vs = d.get("vs_uniform")
        lines.append(f"| {n} | {d.get('embed_dim', '')} | {d.get('params', '')} | {d['measured_ms']:.4f} | "
                     f"{pct(d['mean'])} | {'' if vs is None else pct(vs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from prune_fashion import apply_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("scale", "train", "measure", "report", "all"))
    parser.add_argument("--prune-results", type=Path, default=Path("results/prune_fashion.json"))
    parser.add_argument("--work", type=Path, default=Path("bench-revit-fashion"))
    parser.add_argument("--out", type=Path, default=Path("results/revit_fashion.json"))
    parser.add_argument("--jobs", type=int, default=1, help="Trainings in parallel (one thread each).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets on digits: a smoke run.")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    s = apply_overrides(QUICK if args.quick else Settings(), args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = {"scale": (scale_stage,), "train": (train_stage,), "measure": (measure_stage,), "report": (report_stage,),
              "all": (scale_stage, train_stage, measure_stage, report_stage)}[args.stage]
    for stage in stages:
        stage(args, s)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
