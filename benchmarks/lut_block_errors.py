"""Benchmark: where a whole-model prediction goes wrong, block by block.

Every distinct block of the given models is timed as a full block and as its two halves (attention, MLP),
next to what the table says: the halves it interpolates (uncalibrated) and the block it predicts (with the
block interaction, calibrated). Each whole model is timed too. One interleaved session with the table's
backend and settings (``nvit compare``'s measurement), so the numbers are comparable with the table's own.
A block whose halves the table gets right but whose full block it misses points at the block model, not
at the grid.

    python benchmarks/lut_block_errors.py --lut nvit-demo/lut.parquet nvit-demo/base \\
        nvit-demo/variants/ratio_0.7 nvit-demo/variants/ratio_0.5 --out results/lut_block_errors_demo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec, BlockSpec
from nvit.fileio import atomic_write_text
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable, utc_now
from nvit.profiler.space import arch_for_space
from nvit.profiler.workloads import model_workload, part_workload
from nvit.validation.compare import measure_with_table
from nvit.vocab import PartConfig, PartKind


def block_parts(e: int, b: BlockSpec) -> dict[str, PartConfig]:
    return {"block": PartConfig(PartKind.BLOCK, e, b.heads, b.qk_dim, b.v_dim, b.mlp_dim),
            "attn": PartConfig(PartKind.ATTN, e, b.heads, b.qk_dim, b.v_dim),
            "mlp": PartConfig(PartKind.MLP, e, mlp_dim=b.mlp_dim)}


def predicted_parts(pred: LatencyPredictor, raw: LatencyPredictor, e: int, b: BlockSpec) -> dict[str, float]:
    return {"block": pred.block_latency_ms(e, b), "attn": float(raw.attn_ms(e, b.heads, b.qk_dim, b.v_dim)),
            "mlp": float(raw.mlp_ms(e, b.mlp_dim))}


def run(lut: Path, models: list[str], passes: int) -> dict[str, Any]:
    table = LatencyTable.load(lut)
    pred, raw = LatencyPredictor(table), LatencyPredictor(table, calibrated=False)
    base = ArchSpec.from_dict(table.meta.base_arch)
    specs = {Path(m).name: arch_for_space(m) for m in models}
    parts: dict[str, PartConfig] = {}
    for spec in specs.values():
        fixed = PartConfig(PartKind.FIXED, spec.embed_dim)
        parts[fixed.key] = fixed
        for b in spec.blocks:
            parts.update({c.key: c for c in block_parts(spec.embed_dim, b).values()})
    workloads = [part_workload(c, base, table.meta.batch_size) for c in parts.values()]
    workloads += [model_workload(s, table.meta.batch_size, name=f"model/{n}") for n, s in specs.items()]
    stats, context = measure_with_table(table.meta, workloads, passes=passes)
    measured = {w.name: s.latency_ms_median for w, s in zip(workloads, stats, strict=True)}
    out: dict[str, Any] = {"models": []}
    for name, spec in specs.items():
        blocks = []
        for i, b in enumerate(spec.blocks):
            cfg, want = block_parts(spec.embed_dim, b), predicted_parts(pred, raw, spec.embed_dim, b)
            row: dict[str, Any] = {"index": i, "key": cfg["block"].key}
            for part, c in cfg.items():
                m = measured[c.key]
                row[part] = {"predicted_ms": want[part], "measured_ms": m, "error_pct": 100 * (want[part] - m) / m}
            row["measured_block_over_halves"] = measured[cfg["block"].key] / (
                measured[cfg["attn"].key] + measured[cfg["mlp"].key])
            blocks.append(row)
        whole = measured[f"model/{name}"]
        whole_pred = pred.predict_ms(spec)
        parts_sum = sum(r["block"]["measured_ms"] for r in blocks) + measured[f"fixed/e{spec.embed_dim}"]
        out["models"].append({"name": name, "arch": spec.to_dict(), "blocks": blocks, "predicted_ms": whole_pred,
                              "measured_ms": whole, "error_pct": 100 * (whole_pred - whole) / whole,
                              "measured_parts_sum_ms": parts_sum, "measured_whole_over_parts": whole / parts_sum,
                              "calibration": table.meta.calibration and {
                                  k: getattr(table.meta.calibration, k) for k in ("method", "scale", "offset_ms")}})
    out["context"] = context
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lut", type=Path, required=True)
    parser.add_argument("models", nargs="+", help="variant folders, arch.json files, presets or checkpoints")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(args.lut, args.models, args.passes)
    for model in result["models"]:
        print(f"{model['name']}: predicted {model['predicted_ms']:.4f} ms, measured {model['measured_ms']:.4f} ms "
              f"({model['error_pct']:+.1f}%); measured whole / measured parts {model['measured_whole_over_parts']:.3f}")
        for r in model["blocks"]:
            cells = "  ".join(f"{p} {r[p]['predicted_ms']:.4f}/{r[p]['measured_ms']:.4f} ({r[p]['error_pct']:+.1f}%)"
                              for p in ("attn", "mlp", "block"))
            print(f"  b{r['index']} {r['key']:<26} {cells}  block/halves {r['measured_block_over_halves']:.3f}")
    if args.out:
        doc = {"benchmark": "lut_block_errors", "created_at": utc_now(), "lut": str(args.lut),
               "machine": {"python": platform.python_version(), "processor": platform.processor()}, **result}
        atomic_write_text(args.out, json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
