"""Benchmark: where one latency-table configuration's seconds go.

For a seeded sample of a space's configurations, each step the onnxruntime CPU backend takes is timed
separately: building the torch module, the ONNX export (with the exporter's op registry rebuilt for every
export, as ``torch.onnx.export`` does by default, and shared across exports, as nvit now does), reading a
stored export instead (content-addressed store), creating the session (with its first run), the warm-up
and the timed sampling of the harness (``measure_interleaved``, whose warm-up is fixed wall time).

    flock /work/measure.lock python benchmarks/lut_cost.py --space deit_small --configs 12 \\
        --out results/lut_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nvit.fileio import atomic_write_text
from nvit.lut.table import utc_now
from nvit.models import onnx as onnx_export
from nvit.profiler.backends.common import example_input, module_copy
from nvit.profiler.harness import HarnessConfig, measure_interleaved
from nvit.profiler.onnx_store import OnnxStore, content_key
from nvit.profiler.space import resolve_space
from nvit.profiler.workloads import part_workload
from nvit.vocab import Precision


@contextlib.contextmanager
def per_export_registry():
    """What torch.onnx.export does by default: a new op registry for every export."""
    saved = onnx_export._shared_torchlib_registry
    onnx_export._shared_torchlib_registry = contextlib.nullcontext
    try:
        yield
    finally:
        onnx_export._shared_torchlib_registry = saved


def seeded_configs(space: Any, count: int, seed: int) -> list[Any]:
    """``count`` distinct configurations of ``space``, drawn with ``seed`` (shared with lut_export_worker.py)."""
    everything = space.configs()
    return [everything[i] for i in np.random.default_rng(seed).choice(len(everything), count, replace=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="deit_small")
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    space = resolve_space(args.space)
    configs = seeded_configs(space, args.configs, args.seed)
    harness = HarnessConfig.cpu()
    warmup_s = harness.warmup_s + (harness.repeats - 1) * harness.rewarm_s
    folder = Path(tempfile.mkdtemp(prefix="nvit-cost-"))
    store = OnnxStore(folder / "store", max_bytes=2**34)
    # The first export of a process pays one-off imports and tracing set-up: not a per-configuration cost.
    w0 = part_workload(configs[0], space.base, 1)
    onnx_export.export_onnx(module_copy(w0, Precision.FP32), example_input(w0, Precision.FP32),
                            folder / "first.onnx", dynamic_batch=False)
    rows = []
    for c in configs:
        row: dict[str, float | str] = {"config": c.key}
        t = time.perf_counter()
        w = part_workload(c, space.base, 1)
        module = module_copy(w, Precision.FP32)
        x = example_input(w, Precision.FP32)
        row["build_s"] = time.perf_counter() - t
        with per_export_registry():
            t = time.perf_counter()
            onnx_export.export_onnx(module, x, folder / "a.onnx", dynamic_batch=False)
            row["export_per_call_registry_s"] = time.perf_counter() - t
        t = time.perf_counter()
        onnx_export.export_onnx(module, x, folder / "b.onnx", dynamic_batch=False)
        row["export_shared_registry_s"] = time.perf_counter() - t
        t = time.perf_counter()
        key = content_key(module, w.input_shape, "fp32", onnx_export.DEFAULT_OPSET)
        store.put(key, folder / "b.onnx")
        row["store_put_s"] = time.perf_counter() - t
        t = time.perf_counter()
        key = content_key(module, w.input_shape, "fp32", onnx_export.DEFAULT_OPSET)
        path = store.get(key)
        row["store_hit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        binding = session.io_binding()
        binding.bind_cpu_input(session.get_inputs()[0].name, x.numpy())
        binding.bind_output(session.get_outputs()[0].name, "cpu")
        session.run_with_iobinding(binding)
        binding.bind_ortvalue_output(session.get_outputs()[0].name, binding.get_outputs()[0])
        row["session_s"] = time.perf_counter() - t
        t = time.perf_counter()
        stats = measure_interleaved([functools.partial(session.run_with_iobinding, binding)], harness)[0]
        total = time.perf_counter() - t
        row["warmup_s"] = warmup_s
        row["sampling_s"] = total - warmup_s
        row["latency_ms"] = stats.latency_ms_median
        row["stop_reason"] = stats.stop_reason
        rows.append(row)
        print(f"{c.key:<32} " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    keys = [k for k in rows[0] if k.endswith("_s")]
    medians = {k: float(np.median([r[k] for r in rows])) for k in keys}
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    before = means["build_s"] + means["export_per_call_registry_s"] + means["session_s"] + warmup_s + means[
        "sampling_s"]
    after_cold = before - means["export_per_call_registry_s"] + means["export_shared_registry_s"] + means[
        "store_put_s"]
    after_warm = before - means["export_per_call_registry_s"] + means["store_hit_s"]
    doc = {"benchmark": "lut_cost", "created_at": utc_now(), "host": platform.node(), "space": args.space,
           "configs": len(rows), "harness": harness.to_dict(), "median_s": medians, "mean_s": means,
           "per_config_s": {"before": before, "after_new_export": after_cold, "after_stored_export": after_warm},
           "rows": rows, "load_avg": os.getloadavg()}
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print("mean seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    print(f"per configuration: before {before:.2f} s, after (new export) {after_cold:.2f} s, "
          f"after (stored export) {after_warm:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
