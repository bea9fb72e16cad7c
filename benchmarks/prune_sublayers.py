"""Benchmark: does removing whole sub-layers and blocks beat width-only pruning at equal *measured* latency?

§2's protocol (``prune_fashion.py``: one Fashion-MNIST base, one CPU table, every variant fine-tuned with KD
so that each (method, target) gets ``total_steps`` of training after the base), on a table re-profiled with
its one-half blocks, with targets down to 0.2 of the dense predicted latency. Methods:

- ``knapsack``, ``latency_l3``, ``saliency``: ``nvit prune --ranking …`` with ``--remove none`` (widths only;
  they cannot reach the targets below their floor, which the report says);
- ``knapsack_rm``, ``latency_l3_rm``, ``saliency_rm``: the same with ``--remove attn,mlp``;
- ``depth``: one shot to each target by dropping whole blocks, least salient first, then fine-tuned.

Stages (cached in --work and resumable; only ``measure`` times anything — run it alone, under a lock):
    python benchmarks/prune_sublayers.py run --base BASE --lut LUT --work W --jobs 2
    python benchmarks/prune_sublayers.py measure --base BASE --lut LUT --work W
    python benchmarks/prune_sublayers.py report --base BASE --lut LUT --work W --out results/prune_sublayers.json
``--set seeds=0`` runs one seed; ``--quick --data digits`` is the smoke run (a ``vit_test`` base and a table
with one-half blocks, e.g. the demo's).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import prune_fashion as pf

METHODS = ("knapsack", "knapsack_rm", "latency_l3", "latency_l3_rm", "saliency", "saliency_rm", "depth")
SETTINGS = replace(pf.Settings(), targets=(0.8, 0.65, 0.5, 0.35, 0.25, 0.2))
QUICK = replace(pf.QUICK, targets=(0.8, 0.5, 0.3))
#: The accuracy bar of "the lowest latency a method reaches" (test top-1 after fine-tuning).
ACCURACY_BAR = 0.85


def run_stage(args: argparse.Namespace, s: pf.Settings) -> None:
    todo = [(m, seed) for seed in s.seeds for m in METHODS
            if not (args.work / "runs" / m / f"seed{seed}" / "rows.json").is_file()]
    pf.log(f"{len(todo)} runs to do")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"),
                             initializer=pf._worker_init) as pool:
        futures = [pool.submit(pf.run_one, str(args.base), str(args.lut), s, str(args.work), m, seed)
                   for m, seed in todo]
        for f in futures:
            f.result()
    pf.log("all runs done")


def _removed(arch: dict[str, Any], base_depth: int) -> dict[str, float]:
    from nvit.arch import ArchSpec

    spec = ArchSpec.from_dict(arch)
    gone = spec.removed_sublayers
    dropped = base_depth - spec.depth
    return {"attn_removed": gone["attn"] + dropped, "mlp_removed": gone["mlp"] + dropped,
            "blocks_dropped": dropped, "embed_dim": spec.embed_dim,
            "heads": sum(b.heads for b in spec.blocks), "mlp_dim": sum(b.mlp_dim for b in spec.blocks)}


def report_stage(args: argparse.Namespace, s: pf.Settings) -> None:
    import prune_stats as st

    from nvit import __version__
    from nvit.fileio import atomic_write_text

    runs = {k: v for k, v in pf.load_rows(args.work).items() if k[0] in METHODS}
    measured_doc = json.loads((args.work / "measured.json").read_text())
    measured = measured_doc["models"]
    split = "val" if s.data == "digits" else "test"
    base = pf.load_base_eval(args, s)
    depth = len(base["arch"]["blocks"])
    rows = []
    for (m, seed), doc in sorted(runs.items()):
        for r in doc["rows"]:
            rows.append({**r, **_removed(r["arch"], depth),
                         "measured_ms": measured[f"{m}/s{seed}/{r['target_ratio']:g}"]["measured_ms"]})

    def curves(methods: tuple[str, ...], stage: str) -> dict[str, dict[int, Any]]:
        out = {}
        for m in methods:
            per_seed = {seed: st.curve([(r["measured_ms"], r[f"{split}_{stage}"]) for r in rows
                                        if r["method"] == m and r["seed"] == seed])
                        for seed in s.seeds if sum(r["method"] == m and r["seed"] == seed for r in rows) >= 2}
            if per_seed:
                out[m] = per_seed
        return out

    width_and_rm = tuple(m for m in METHODS)
    below_floor = tuple(m for m in METHODS if m.endswith("_rm") or m == "depth")
    comparison = {stage: {"all_vs_saliency": st.compare_methods(curves(width_and_rm, stage), "saliency"),
                          "below_width_floor_vs_saliency_rm": st.compare_methods(curves(below_floor, stage),
                                                                                 "saliency_rm")}
                  for stage in ("after", "before")}
    lowest = {}
    for m in METHODS:
        per_seed = [min((r["measured_ms"] for r in rows if r["method"] == m and r["seed"] == seed
                         and r[f"{split}_after"] >= ACCURACY_BAR), default=float("nan")) for seed in s.seeds]
        lowest[m] = {"per_seed_ms": per_seed, "mean_ms": float(np.nanmean(per_seed)) if np.isfinite(per_seed).any()
                     else None}
    reached = {m: sorted({r["target_ratio"] for r in rows if r["method"] == m}, reverse=True) for m in METHODS}
    doc = {"kind": "nvit.benchmark.prune_sublayers", "version": 1, "nvit_version": __version__,
           "host": platform.node(), "settings": asdict(s), "split": split, "accuracy_bar": ACCURACY_BAR,
           "base": {**base, "measured_ms": measured["base"]["measured_ms"]}, "targets_reached": reached,
           "unreachable": {f"{m}/s{seed}": doc.get("unreachable", []) for (m, seed), doc in runs.items()},
           "lowest_ms_at_bar": lowest, "comparison": comparison, "rows": rows,
           "cpu_seconds": {f"{m}/s{seed}": doc["cpu_seconds"] for (m, seed), doc in runs.items()},
           "measure_seconds": measured_doc["seconds"], "measure_context": measured_doc.get("context")}
    atomic_write_text(args.out, json.dumps(doc, indent=1, default=float) + "\n")
    print(markdown(doc))
    pf.log(f"wrote {args.out}")


def markdown(doc: dict[str, Any]) -> str:
    """The report's tables for BENCHMARKS.md."""
    split = doc["split"]
    lines = []
    for key, title in (("all_vs_saliency", "every method, on the range all reach"),
                       ("below_width_floor_vs_saliency_rm", "sub-layer and depth methods, on their common range")):
        for stage in ("after", "before"):
            c = doc["comparison"][stage][key]
            lo, hi = c["range_ms"]
            lines += ["", f"{title}, {stage} fine-tuning: {split} top-1 (%), mean over {lo:.4f}–{hi:.4f} ms, "
                      f"Δ vs {c['reference']} [95% CI]", "", "| method | top-1 | Δ |", "|---|---|---|"]
            for m, item in sorted(c["methods"].items(), key=lambda kv: -kv[1]["mean_top1"]):
                d = item.get("vs_reference_mean_top1")
                ci = "—" if d is None else (f"{100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, "
                                            f"{100 * d['ci95'][1]:+.2f}]")
                lines.append(f"| {m} | {100 * item['mean_top1']:.2f} | {ci} |")
    lines += ["", f"per target: {split} top-1 after FT, mean over seeds (measured ms; attention / MLP sub-layers "
              "removed, blocks dropped, mean)", "",
              "| method | " + " | ".join(f"{t:g}" for t in doc["settings"]["targets"]) + " |",
              "|---|" + "---|" * len(doc["settings"]["targets"])]
    for m in METHODS:
        cells = []
        for t in doc["settings"]["targets"]:
            rs = [r for r in doc["rows"] if r["method"] == m and r["target_ratio"] == t]
            if not rs:
                cells.append("unreachable")
                continue
            mean = lambda k, rs=rs: float(np.mean([r[k] for r in rs]))  # noqa: E731
            cells.append(f"{100 * mean(f'{split}_after'):.2f} ({mean('measured_ms'):.4f}; "
                         f"{mean('attn_removed'):.1f}/{mean('mlp_removed'):.1f}/{mean('blocks_dropped'):.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"lowest measured latency at >= {100 * doc['accuracy_bar']:.0f}% {split} top-1 (mean over seeds): "
              + ", ".join(f"{m} {v['mean_ms']:.4f} ms" if v["mean_ms"] else f"{m} never"
                          for m, v in doc["lowest_ms_at_bar"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("run", "measure", "report"))
    parser.add_argument("--base", type=Path, required=True, help="The trained base (a variant folder).")
    parser.add_argument("--lut", type=Path, required=True, help="A latency table of the base with one-half blocks.")
    parser.add_argument("--work", type=Path, default=Path("bench-prune-sublayers"))
    parser.add_argument("--out", type=Path, default=Path("results/prune_sublayers.json"))
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (one thread each).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets on digits: a smoke run.")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    s = pf.apply_overrides(QUICK if args.quick else SETTINGS, args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    {"run": run_stage, "measure": pf.measure_stage, "report": report_stage}[args.stage](args, s)


if __name__ == "__main__":
    main()
