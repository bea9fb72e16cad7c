"""Benchmark: a table's predictions against whole models it never saw, shaped like pruning's results.

Two steps, so measurements (which need the machine to itself) and evaluation (which does not) stay apart:

``measure`` times a set of whole models with the backend and settings recorded in a table (two passes,
each in a new random order, a few models interleaved at a time; a model keeps its fastest pass), and
appends every measurement to a JSON file as it goes: a rerun resumes, and ``--budget-s`` ends a run
early so that each locked section stays short. Sets:

- ``pruned``: :func:`nvit.profiler.sampling.pruned_arch` (blocks narrow — 1–2 heads, Q/K/V of 8–16,
  MLP 8–32 — mid or wide, mixed in one model; embedding 50–100% of dense);
- ``random``: :func:`nvit.profiler.sampling.random_arch` (every width 30–100% of dense);
- the dense base is always measured too (the FLOPs baseline is scaled to it).

``evaluate`` predicts every measured model with each table given (``--lut`` several times: before /
after) and with the FLOPs-proportional baseline, and writes MAPE, max, within ±5/±10%, Kendall τ, bias.
Evaluation reads only ``LatencyPredictor(table).predict_ms``, so it also runs against older nvit code.

    flock /work/measure.lock python benchmarks/lut_pruned_shapes.py measure --lut T.parquet --set pruned \\
        --models 24 --seed 1000 --work bench-work --budget-s 900
    python benchmarks/lut_pruned_shapes.py evaluate --lut T.parquet --measured bench-work/T-pruned-s1000.json \\
        --out results/lut_pruned_shapes.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nvit import __version__
from nvit.arch import ArchSpec
from nvit.errors import NvitError
from nvit.fileio import atomic_write_text
from nvit.lut.base import FlopsPredictor
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable, utc_now

SETS = ("pruned", "random")
DENSE = "dense"


def archs_of_set(base: ArchSpec, kind: str, count: int, seed: int) -> list[ArchSpec]:
    from nvit.profiler.sampling import pruned_arch, random_arch

    rng = np.random.default_rng(seed)
    draw = pruned_arch if kind == "pruned" else random_arch
    return [replace(base, name=DENSE)] + [draw(base, rng, name=f"{kind}{i:02d}") for i in range(count)]


def measured_path(work: Path, lut: Path, kind: str, seed: int) -> Path:
    return work / f"{lut.stem}-{kind}-s{seed}.json"


def measure(args: argparse.Namespace) -> int:
    from nvit.profiler.selfcheck import measure_archs
    from nvit.validation.compare import backend_for_table, check_same_device

    table = LatencyTable.load(args.lut)
    base = ArchSpec.from_dict(table.meta.base_arch)
    archs = archs_of_set(base, args.set, args.models, args.seed)
    path = args.out or measured_path(args.work, args.lut, args.set, args.seed)
    doc = json.loads(path.read_text()) if path.exists() else {
        "benchmark": "lut_pruned_shapes", "set": args.set, "seed": args.seed, "models": args.models,
        "lut": str(args.lut), "table_created_at": table.meta.created_at, "settings": table.meta.settings,
        "device": table.meta.device_name(), "host": platform.node(), "nvit_version": __version__,
        "archs": [a.to_dict() for a in archs], "timings": []}
    if len(doc["archs"]) != len(archs) or doc["seed"] != args.seed or doc["set"] != args.set:
        raise NvitError(f"{path} holds another set; choose another --out")
    done = {(t["name"], t["pass"]): t["latency_ms"] for t in doc["timings"]}
    deadline = time.monotonic() + args.budget_s

    def on_timing(t: Any) -> None:
        doc["timings"].append({"name": t.name, "pass": t.pass_index, "latency_ms": t.latency_ms,
                               "seconds": t.seconds, "stats": t.stats, "measured_at": utc_now()})
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")

    backend = backend_for_table(table.meta)
    with backend:
        check_same_device(table.meta, backend)
        measure_archs(backend, archs, passes=args.passes, seed=args.seed, done=done, on_timing=on_timing,
                      should_stop=lambda: time.monotonic() > deadline)
    left = args.passes * len(archs) - len(doc["timings"])
    if left:
        print(f"time budget spent: {len(doc['timings'])} measurements in {path}, {left} left; rerun to resume")
        return 3
    print(f"complete: {path}")
    return 0


def load_measured(path: Path) -> tuple[list[ArchSpec], dict[str, float], dict[str, Any]]:
    doc = json.loads(path.read_text())
    archs = [ArchSpec.from_dict(a) for a in doc["archs"]]
    best: dict[str, float] = {}
    for t in doc["timings"]:
        best[t["name"]] = min(t["latency_ms"], best.get(t["name"], t["latency_ms"]))
    missing = [a.name for a in archs if a.name not in best]
    if missing:
        raise NvitError(f"{path} is incomplete ({len(missing)} models unmeasured); run measure again")
    return archs, best, doc


def figures(measured: list[float], predicted: list[float]) -> dict[str, Any]:
    from scipy.stats import kendalltau

    m, p = np.asarray(measured), np.asarray(predicted)
    err = (p - m) / m * 100
    a = np.abs(err)
    return {"n": int(m.size), "mape_pct": float(a.mean()), "max_abs_pct": float(a.max()),
            "within_5pct": float(np.mean(a <= 5)), "within_10pct": float(np.mean(a <= 10)),
            "kendall_tau": float(kendalltau(m, p).statistic), "bias_pct": float(err.mean())}


def evaluate(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"benchmark": "lut_pruned_shapes", "created_at": utc_now(), "nvit_version": __version__,
                           "host": platform.node(), "sets": {}}
    for mpath in args.measured:
        archs, best, doc = load_measured(mpath)
        evals = [a for a in archs if a.name != DENSE]
        ys = [best[a.name] for a in evals]
        dense = next(a for a in archs if a.name == DENSE)
        predictors: dict[str, Any] = {"flops_proportional": FlopsPredictor(dense, best[DENSE])}
        for label, lut in zip(args.label or [p.stem for p in args.lut], args.lut, strict=True):
            predictors[label] = LatencyPredictor(LatencyTable.load(lut))
        entry: dict[str, Any] = {"measured": str(mpath), "set": doc["set"], "seed": doc["seed"],
                                 "dense_ms": best[DENSE], "luts": {lb: str(p) for lb, p in
                                                                   zip(args.label or [], args.lut, strict=False)},
                                 "results": {}, "models": []}
        preds = {name: [p.predict_ms(a) for a in evals] for name, p in predictors.items()}
        for name, ps in preds.items():
            entry["results"][name] = figures(ys, ps)
        for i, a in enumerate(evals):
            entry["models"].append({"name": a.name, "measured_ms": ys[i], "embed_dim": a.embed_dim,
                                    **{f"predicted_ms_{n}": ps[i] for n, ps in preds.items()}})
        out["sets"][mpath.stem] = entry
        print(f"{mpath.stem}: {len(evals)} models, dense {best[DENSE]:.3f} ms")
        for name, r in entry["results"].items():
            print(f"  {name:<28} MAPE {r['mape_pct']:5.2f}%  max {r['max_abs_pct']:5.1f}%  "
                  f"±5% {r['within_5pct'] * 100:5.1f}%  ±10% {r['within_10pct'] * 100:5.1f}%  "
                  f"tau {r['kendall_tau']:.3f}  bias {r['bias_pct']:+.2f}%")
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="Measure a set of whole models (resumable).")
    m.add_argument("--lut", type=Path, required=True, help="The table whose backend settings to measure with.")
    m.add_argument("--set", choices=SETS, default="pruned")
    m.add_argument("--models", type=int, default=24)
    m.add_argument("--seed", type=int, default=1000, help="Seed of the set (keep it away from fitting seeds).")
    m.add_argument("--passes", type=int, default=2)
    m.add_argument("--work", type=Path, default=Path("bench-work"))
    m.add_argument("--out", type=Path, default=None, help="The measurements file (default: in --work).")
    m.add_argument("--budget-s", type=float, default=1200.0, help="Stop after this long (rerun to resume).")
    e = sub.add_parser("evaluate", help="Predicted vs measured for one or more tables.")
    e.add_argument("--lut", type=Path, action="append", required=True)
    e.add_argument("--label", action="append", help="A name per --lut (default: file stem).")
    e.add_argument("--measured", type=Path, action="append", required=True)
    e.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    try:
        return measure(args) if args.command == "measure" else evaluate(args)
    except NvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
