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
import contextlib
import json
import platform
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import prune_fashion as pf

METHODS = ("knapsack", "knapsack_rm", "latency_l3", "latency_l3_rm", "saliency", "saliency_rm", "depth",
           "knapsack_rm_mt", "saliency_rm_mt")
#: Run order: the default and its nearest rivals first, then the measured-target runs (alone, under the
#: measurement lock: they time models), then the rest; a stopped run stage leaves the most useful part done.
FIRST = ("knapsack_rm", "saliency_rm", "knapsack", "saliency", "latency_l3")
MEASURED = ("knapsack_rm_mt", "saliency_rm_mt")
SETTINGS = replace(pf.Settings(), targets=(0.8, 0.65, 0.5, 0.35, 0.25, 0.2))
QUICK = replace(pf.QUICK, targets=(0.8, 0.5, 0.3))
#: The accuracy bar of "the lowest latency a method reaches" (test top-1 after fine-tuning).
ACCURACY_BAR = 0.85


def run_stage(args: argparse.Namespace, s: pf.Settings) -> None:
    def todo(methods: tuple[str, ...]) -> list[tuple[str, int]]:
        return [(m, seed) for m in methods for seed in s.seeds
                if not (args.work / "runs" / m / f"seed{seed}" / "rows.json").is_file()]

    rest = tuple(m for m in METHODS if m not in FIRST + MEASURED)
    for methods, jobs, locked in ((FIRST, args.jobs, False), (MEASURED, 1, True), (rest, args.jobs, False)):
        runs = todo(methods)
        if not runs:
            continue
        pf.log(f"{len(runs)} runs to do ({', '.join(methods)}; {jobs} at a time{', under the lock' if locked else ''})")
        with _lock(args.lock if locked else None):
            if jobs == 1:  # one at a time: in this process
                for m, seed in runs:
                    pf.run_one(str(args.base), str(args.lut), s, str(args.work), m, seed)
                continue
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                                     initializer=pf._worker_init) as pool:
                futures = [pool.submit(pf.run_one, str(args.base), str(args.lut), s, str(args.work), m, seed)
                           for m, seed in runs]
                for f in futures:
                    f.result()
    pf.log("all runs done")


@contextlib.contextmanager
def _lock(path: Path | None) -> Iterator[None]:
    """Hold the measurement lock file (``flock``) while runs that time models go on."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        pf.log(f"waiting for {path}")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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

    def compare(methods: tuple[str, ...], reference: str, stage: str) -> dict[str, Any] | None:
        c = curves(methods, stage)
        return st.compare_methods(c, reference) if reference in c and len(c) > 1 else None

    open_loop = tuple(m for m in METHODS if not m.endswith("_mt"))
    below_floor = tuple(m for m in open_loop if m.endswith("_rm") or m == "depth")
    pairs = {"removal_vs_width_only": [(f"{m}_rm", m) for m in ("knapsack", "latency_l3", "saliency")],
             "measured_vs_open_loop": [(f"{m}_mt", m) for m in ("knapsack_rm", "saliency_rm")]}
    comparison = {stage: {"all_vs_saliency": compare(open_loop, "saliency", stage),
                          "below_width_floor_vs_saliency_rm": compare(below_floor, "saliency_rm", stage),
                          **{f"{key}/{a}": compare((a, b), b, stage) for key, items in pairs.items()
                             for a, b in items}}
                  for stage in ("after", "before")}
    dense_ms = base["predicted_ms"]
    for r in rows:  # the target each variant was pruned to, and whether the final session met it
        r["target_ms"] = r["target_ratio"] * dense_ms
        r["measured_over_target"] = r["measured_ms"] / r["target_ms"]
        r["predicted_error"] = r["predicted_ms"] / r["measured_ms"] - 1
    targets_met = {}
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            over = np.array([r["measured_over_target"] for r in rs])
            targets_met[m] = {"variants": len(rs), "met": int((over <= 1).sum()),
                              "met_within_3pct": int((over <= 1.03).sum()),
                              "worst_over_target": float(over.max()), "median_over_target": float(np.median(over)),
                              "predicted_error_median": float(np.median([r["predicted_error"] for r in rs])),
                              "predicted_error_min": float(min(r["predicted_error"] for r in rs))}
    loops = {f"{m}/s{seed}": doc.get("measured_loop") for (m, seed), doc in runs.items() if m.endswith("_mt")}
    ran = tuple(m for m in METHODS if any(r["method"] == m for r in rows))  # a partial run reports what ran
    lowest = {}
    for m in ran:
        per_seed = [min((r["measured_ms"] for r in rows if r["method"] == m and r["seed"] == seed
                         and r[f"{split}_after"] >= ACCURACY_BAR), default=float("nan")) for seed in s.seeds]
        lowest[m] = {"per_seed_ms": per_seed, "mean_ms": float(np.nanmean(per_seed)) if np.isfinite(per_seed).any()
                     else None}
    reached = {m: sorted({r["target_ratio"] for r in rows if r["method"] == m}, reverse=True) for m in ran}
    doc = {"kind": "nvit.benchmark.prune_sublayers", "version": 2, "nvit_version": __version__,
           "host": platform.node(), "settings": asdict(s), "split": split, "accuracy_bar": ACCURACY_BAR,
           "base": {**base, "measured_ms": measured["base"]["measured_ms"]}, "targets_reached": reached,
           "unreachable": {f"{m}/s{seed}": doc.get("unreachable", []) for (m, seed), doc in runs.items()},
           "lowest_ms_at_bar": lowest, "comparison": comparison, "targets_met": targets_met,
           "measured_loops": loops, "rows": rows,
           "cpu_seconds": {f"{m}/s{seed}": doc["cpu_seconds"] for (m, seed), doc in runs.items()},
           "measure_seconds": measured_doc["seconds"], "measure_context": measured_doc.get("context")}
    atomic_write_text(args.out, json.dumps(doc, indent=1, default=float) + "\n")
    print(markdown(doc))
    pf.log(f"wrote {args.out}")


def markdown(doc: dict[str, Any]) -> str:
    """The report's tables for BENCHMARKS.md."""
    split = doc["split"]
    lines = []
    titles = {"all_vs_saliency": "every method (open loop), on the range all reach",
              "below_width_floor_vs_saliency_rm": "sub-layer and depth methods, on their common range"}
    for key in doc["comparison"]["after"]:
        title = titles.get(key, key.replace("/", ": ").replace("_", " "))
        for stage in ("after", "before"):
            c = doc["comparison"][stage][key]
            if c is None:
                continue
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
    for m in doc["targets_reached"]:
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
    lines += ["", "targets met at measured latency (the final interleaved session; target = ratio × dense predicted)",
              "", "| method | variants | met | within 3% | median / worst measured ÷ target | "
              "predicted error median / most negative |", "|---|---|---|---|---|---|"]
    for m, t in doc["targets_met"].items():
        lines.append(f"| {m} | {t['variants']} | {t['met']} | {t['met_within_3pct']} | "
                     f"{t['median_over_target']:.3f} / {t['worst_over_target']:.3f} | "
                     f"{100 * t['predicted_error_median']:+.1f}% / {100 * t['predicted_error_min']:+.1f}% |")
    cpu = doc["cpu_seconds"]
    for m in ("knapsack_rm", "saliency_rm"):
        runs = [(seed, cpu.get(f"{m}/s{seed}"), cpu.get(f"{m}_mt/s{seed}"), (doc["measured_loops"] or {}).get(
            f"{m}_mt/s{seed}")) for seed in doc["settings"]["seeds"]]
        cells = [f"seed {seed}: {a / 60:.1f} → {b / 60:.1f} CPU min, {loop['measurements']} measurements in "
                 f"{loop['seconds']:.0f} s, correction {loop['correction']:.3f}"
                 for seed, a, b, loop in runs if a and b and loop]
        if cells:
            lines += ["", f"{m} with measured targets, extra time: " + "; ".join(cells)]
    lines += ["", "widths per seed (per block: heads·Q/K/V·MLP, `-` a removed sub-layer; `e` the embedding width)", "",
              "| method | target | seed 0 | seed 1 | seed 2 |", "|---|---|---|---|---|"]
    for m in METHODS:
        for t in doc["settings"]["targets"]:
            cells = []
            for seed in doc["settings"]["seeds"]:
                r = next((r for r in doc["rows"] if r["method"] == m and r["seed"] == seed
                          and r["target_ratio"] == t), None)
                cells.append("—" if r is None else compact_arch(r["arch"]))
            if any(c != "—" for c in cells):
                lines.append(f"| {m} | {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_arch(arch: dict[str, Any]) -> str:
    """``e64: 4·8/8·64, 3·8/8·-`` (a block's heads·Q/K/V·MLP; ``-`` where the sub-layer went)."""
    def block(b: dict[str, int]) -> str:
        attn = f"{b['heads']}·{b['qk_dim']}/{b['v_dim']}" if b["heads"] else "-"
        return f"{attn}·{b['mlp_dim'] or '-'}"

    return f"e{arch['embed_dim']}: " + ", ".join(block(b) for b in arch["blocks"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("run", "measure", "report"))
    parser.add_argument("--base", type=Path, required=True, help="The trained base (a variant folder).")
    parser.add_argument("--lut", type=Path, required=True, help="A latency table of the base with one-half blocks.")
    parser.add_argument("--work", type=Path, default=Path("bench-prune-sublayers"))
    parser.add_argument("--out", type=Path, default=Path("results/prune_sublayers.json"))
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (one thread each).")
    parser.add_argument("--lock", type=Path, default=Path("../measure.lock"),
                        help="The measurement lock file, held while measured-target runs time models.")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets on digits: a smoke run.")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    s = pf.apply_overrides(QUICK if args.quick else SETTINGS, args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    {"run": run_stage, "measure": pf.measure_stage, "report": report_stage}[args.stage](args, s)


if __name__ == "__main__":
    main()
