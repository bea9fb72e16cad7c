"""Benchmark: does exporting ONNX in a second process disturb the timing of the first, on this CPU?

The profiler could export the next configurations in a worker process while the current one is timed.
On a GPU the two hardly meet; on a 2-core CPU they share cores, caches and memory bandwidth. This times
the same configurations (one onnxruntime thread, the profiler's harness) alternately with and without a
worker that exports models back to back (ABAB..., ``--rounds`` rounds), and reports the median ratio of
each configuration's latency with the worker to without it, and the worker's exports per second.

    flock /work/measure.lock python benchmarks/lut_export_worker.py --space deit_tiny --configs 12 \\
        --rounds 3 --out results/lut_export_worker.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from lut_cost import seeded_configs

from nvit.fileio import atomic_write_text
from nvit.lut.table import utc_now
from nvit.profiler.base import get_backend
from nvit.profiler.space import resolve_space
from nvit.profiler.workloads import part_workload
from nvit.vocab import DeviceKind, Precision


def _exporter(space_name: str, stop: Any, count: Any) -> None:
    """Export configurations of the space one after another until told to stop (no store: real work)."""
    import tempfile

    from nvit.models.onnx import export_onnx
    from nvit.profiler.backends.common import example_input, module_copy

    space = resolve_space(space_name)
    configs = space.configs()
    folder = Path(tempfile.mkdtemp(prefix="nvit-worker-"))
    i = 0
    while not stop.is_set():
        w = part_workload(configs[i % len(configs)], space.base, 1)
        export_onnx(module_copy(w, Precision.FP32), example_input(w, Precision.FP32), folder / "w.onnx",
                    dynamic_batch=False)
        with count.get_lock():
            count.value += 1
        i += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="deit_tiny")
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    space = resolve_space(args.space)
    configs = seeded_configs(space, args.configs, args.seed)
    workloads = [part_workload(c, space.base, 1) for c in configs]
    runs: dict[str, list[list[float]]] = {"alone": [], "with_worker": []}
    exports_per_s = []
    ctx = mp.get_context("spawn")
    with get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP32, batch_size=1,
                                    intra_op_threads=1) as backend:
        for w in workloads:  # export once, outside the comparison
            backend.measure(w)
        for r in range(args.rounds):
            for mode in ("alone", "with_worker") if r % 2 == 0 else ("with_worker", "alone"):
                stop, count, proc = ctx.Event(), ctx.Value("i", 0), None
                if mode == "with_worker":
                    proc = ctx.Process(target=_exporter, args=(args.space, stop, count), daemon=True)
                    proc.start()
                    time.sleep(8.0)  # past the worker's imports: measure while it exports
                    start_count, t0 = count.value, time.perf_counter()
                runs[mode].append([s.latency_ms_median for s in (backend.measure(w) for w in workloads)])
                if proc is not None:
                    exports_per_s.append((count.value - start_count) / (time.perf_counter() - t0))
                    stop.set()
                    proc.join(timeout=60)
                print(f"round {r} {mode}: median {np.median(runs[mode][-1]):.4f} ms")
    alone, worker = np.array(runs["alone"]), np.array(runs["with_worker"])
    best_alone, best_worker = alone.min(axis=0), worker.min(axis=0)
    ratio = best_worker / best_alone
    doc = {"benchmark": "lut_export_worker", "created_at": utc_now(), "host": platform.node(),
           "space": args.space, "configs": [c.key for c in configs], "rounds": args.rounds,
           "alone_ms": runs["alone"], "with_worker_ms": runs["with_worker"],
           "ratio_per_config": ratio.tolist(), "ratio_median": float(np.median(ratio)),
           "ratio_max": float(ratio.max()), "round_ratio_medians": (np.median(worker / alone, axis=1)).tolist(),
           "worker_exports_per_s": exports_per_s, "load_avg": os.getloadavg()}
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"latency with a worker exporting / alone: median {doc['ratio_median']:.3f}, max {doc['ratio_max']:.3f}; "
          f"worker {np.mean(exports_per_s):.2f} exports/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
