"""Benchmark: how well a block is predicted from its two halves, by the block model, on blocks left out.

Every full block a table measured is predicted from the table's attention and MLP halves and from the
*other* full blocks (leave one out), once with one ratio per embedding width (how tables were read before:
``block = ρ(e) · halves``) and once with the size-dependent interaction (:mod:`nvit.lut.interaction`:
``block = slope · halves + overhead(e)``). Reported per table: MAPE and bias over all blocks, over the
narrower half of the blocks (halves below the median of their embedding width) and over the wider half.
No measurement: it reads tables only.

    python benchmarks/lut_block_interaction.py bench-work/after-deit_tiny.parquet ... \\
        --out results/lut_block_interaction.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from nvit.fileio import atomic_write_text
from nvit.lut.interaction import BlockInteraction
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable, utc_now
from nvit.vocab import PartKind


def leave_one_out(path: Path) -> dict[str, Any]:
    table = LatencyTable.load(path)
    raw = LatencyPredictor(table, calibrated=False)
    blocks = table.of_kind(PartKind.BLOCK)
    e, h, q, v, m = (blocks[c].to_numpy().astype(float) for c in ("embed_dim", "heads", "qk_dim", "v_dim", "mlp_dim"))
    measured = blocks["latency_ms_median"].to_numpy(dtype=float)
    halves = raw.attn_ms(e, h, q, v) + raw.mlp_ms(e, m)
    errors: dict[str, list[float]] = {"ratio_per_embed": [], "size_dependent": []}
    narrow = np.array([halves[i] < np.median(halves[e == e[i]]) for i in range(len(e))])
    for i in range(len(measured)):
        rest = np.arange(len(measured)) != i
        same_e = rest & (e == e[i])
        ratio = np.mean(measured[same_e] / halves[same_e]) if same_e.any() else np.mean(measured[rest] / halves[rest])
        errors["ratio_per_embed"].append(ratio * halves[i] / measured[i] - 1)
        fit = BlockInteraction.fit(e[rest], halves[rest], measured[rest])
        errors["size_dependent"].append(float(fit(e[i], halves[i])) / measured[i] - 1)
    out: dict[str, Any] = {"table": str(path), "base": table.meta.base_arch.get("name"), "blocks": len(measured)}
    for name, errs in errors.items():
        err = np.asarray(errs) * 100
        out[name] = {part: {"mape_pct": float(np.abs(err[sel]).mean()), "bias_pct": float(err[sel].mean())}
                     for part, sel in (("all", np.ones_like(narrow)), ("narrow_half", narrow), ("wide_half", ~narrow))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("luts", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = [leave_one_out(p) for p in args.luts]
    for r in rows:
        print(f"{r['table']} ({r['base']}, {r['blocks']} blocks): MAPE / bias, all | narrow half | wide half")
        for name in ("ratio_per_embed", "size_dependent"):
            cells = " | ".join(f"{r[name][p]['mape_pct']:.2f}% / {r[name][p]['bias_pct']:+.2f}%"
                               for p in ("all", "narrow_half", "wide_half"))
            print(f"  {name:<16} {cells}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"benchmark": "lut_block_interaction", "created_at": utc_now(),
                                                "tables": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
