"""Benchmark: does a table that learned from the models a pruning run measured predict *other* models better?

Inputs are a finished ``prune_sublayers.py`` work folder: its measured-target runs (``*_mt``) timed every
variant where it crossed a target (drift-corrected, with its architecture), and its final interleaved
session measured every variant of every method. The table learns from the loop's measurements
(:func:`nvit.lut.learn.learn`), and both tables predict the variants of the open-loop methods, which the loop
never measured: their measured latency in the final session is the held-out truth.

    python benchmarks/lut_learn_heldout.py --lut W/lut.parquet --work W/sub --out results/lut_learn_heldout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    from nvit.arch import ArchSpec
    from nvit.fileio import atomic_write_text, file_sha256
    from nvit.lut.learn import MeasuredModel, learn
    from nvit.lut.predictor import LatencyPredictor
    from nvit.lut.table import LatencyTable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lut", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="prune_sublayers.py's work folder (measured)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    table = LatencyTable.load(args.lut)
    learned_from = []
    for path in sorted((args.work / "runs").glob("*_mt/seed*/rows.json")):
        loop = json.loads(path.read_text())["measured_loop"]
        for r in loop["records"]:
            learned_from.append(MeasuredModel(f"{path.parent.parent.name}/{path.parent.name}/{r['target']}#{r['try']}",
                                              ArchSpec.from_dict(r["arch"]), float(r["corrected_ms"]), "prune",
                                              str(path)))
    learned = learn(table, learned_from, parent_sha256=file_sha256(args.lut))
    before, after = LatencyPredictor(table), LatencyPredictor(learned)
    before.warn_outside = after.warn_outside = False
    measured = json.loads((args.work / "measured.json").read_text())["models"]
    held = []
    for path in sorted((args.work / "runs").glob("*/seed*/rows.json")):
        method = path.parent.parent.name
        if method.endswith("_mt"):
            continue
        for r in json.loads(path.read_text())["rows"]:
            spec = ArchSpec.from_dict(r["arch"])
            truth = measured[f"{method}/s{r['seed']}/{r['target_ratio']:g}"]["measured_ms"]
            held.append({"name": f"{method}/s{r['seed']}/{r['target_ratio']:g}", "measured_ms": truth,
                         "before_ms": before.predict_ms(spec), "after_ms": after.predict_ms(spec)})

    def figures(key: str) -> dict[str, float]:
        err = np.array([h[key] / h["measured_ms"] - 1 for h in held]) * 100
        return {"mape_pct": float(np.mean(np.abs(err))), "bias_pct": float(np.mean(err)),
                "max_abs_pct": float(np.max(np.abs(err))), "within_3pct": float(np.mean(np.abs(err) <= 3))}

    cal = learned.meta.calibration
    doc = {"kind": "nvit.benchmark.lut_learn_heldout", "version": 1, "learned_models": len(learned_from),
           "learned": cal.learned, "calibration_before": {k: getattr(table.meta.calibration, k) for k in
                                                           ("method", "scale", "offset_ms", "per_block_ms")},
           "calibration_after": {k: getattr(cal, k) for k in ("method", "scale", "offset_ms", "per_block_ms")},
           "held_out_variants": len(held), "before": figures("before_ms"), "after": figures("after_ms"),
           "variants": held}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("learned_models", "held_out_variants", "before", "after",
                                          "calibration_before", "calibration_after")}, indent=1))
    print("leave-one-out on the learned models:", {k: v for k, v in cal["learned"]["held_out"].items()
                                                    if k != "models"})


if __name__ == "__main__":
    main()
