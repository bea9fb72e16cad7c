"""Benchmark (issue 3): how well the LUT predictor interpolates, and what a table costs.

1. Held-out grid points: drop every other grid value along each axis of the attention, MLP and fixed-part
   grids (both ends kept), rebuild the predictor from the rest, predict the dropped points. This measures
   a grid twice as coarse as the real one, so it bounds the real interpolation error from above.
2. Off-grid configurations: random attention halves, MLP halves and full blocks at widths between the grid
   values (multiples of 8), measured now with the same backend, against the full table's prediction
   (full blocks also test the attention/MLP interaction model).
3. Cost: seconds per configuration by kind and for the whole table (from the table's own timings), and
   the estimate for a full ``deit_small`` table from those per-kind costs.

Full run (profiles the deit_small table first, resumable, ~25 min on 2 CPU cores, then ~3 min):
    python benchmarks/lut_interpolation.py --space deit_small --work bench-work --out results/lut_interpolation.json
Smoke run (a reduced deit_small space, ~2 min):
    python benchmarks/lut_interpolation.py --quick --work /tmp/bench --out /tmp/lut_interpolation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nvit import __version__
from nvit.arch import ArchSpec
from nvit.errors import NvitError
from nvit.fileio import atomic_write_text
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable, check_compatible, utc_now
from nvit.presets import preset
from nvit.profiler.base import get_backend
from nvit.profiler.space import SearchSpace, preset_space, resolve_space
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.profiler.workloads import part_workload
from nvit.vocab import KIND_FIELDS, DeviceKind, PartConfig, PartKind, Precision

ALIGN = 8  # off-grid widths are multiples of the pruning group size
QUICK_OFFGRID = 4


def quick_space() -> SearchSpace:
    """A reduced deit_small space: 36 attention, 9 MLP, 3 blocks, 3 fixed parts (a couple of minutes)."""
    return SearchSpace(base=preset("deit_small"), embed_dims=(128, 256, 384), heads=(2, 4, 6), qk_dims=(32, 64),
                       v_dims=(32, 64), mlp_dims=(512, 1024, 1536), blocks_per_embed=1, name="deit_small_quick")


# ---- shared with lut_end_to_end.py ----------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="Where to write the results (JSON).")
    parser.add_argument("--lut", type=Path, help="Use this table instead of profiling one.")
    parser.add_argument("--space", default="deit_small", help="Space to profile when no --lut is given.")
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="Folder for a profiled table.")
    parser.add_argument("--backend", default=None, help="Backend (default: the table's with --lut, else "
                        "onnxruntime, tensorrt with --gpu).")
    parser.add_argument("--gpu", action="store_true", help="Measure on the CUDA device.")
    parser.add_argument("--threads", type=int, default=None, help="Intra-op threads of CPU backends (default: "
                        "the table's with --lut, else every available core).")
    parser.add_argument("--quick", action="store_true", help="Small settings: a smoke run of a few minutes.")
    parser.add_argument("--passes", type=int, default=1, help="Sweep passes when profiling (see nvit profile).")
    parser.add_argument("--allow-settings-mismatch", action="store_true",
                        help="Measure even if the backend's settings differ from the table's.")


def make_backend(args: argparse.Namespace, precision: Precision, batch_size: int, meta: Any = None) -> Any:
    """With a table and no backend flags: the backend exactly as recorded in the table (its constructor
    options and harness). Otherwise the backend the flags name."""
    from nvit.profiler.backends import default_backend
    from nvit.validation.compare import backend_for_table

    if meta is not None and args.backend is None and args.threads is None and not args.gpu:
        return backend_for_table(meta)
    device = DeviceKind.CUDA if args.gpu else DeviceKind.CPU
    options = {} if args.threads is None else {"intra_op_threads": args.threads}
    return get_backend(args.backend or default_backend(device))(device=device, precision=precision,
                                                                 batch_size=batch_size, **options)


class Reporter:
    """Plain progress lines on stderr (benchmarks run unattended; logs stay greppable)."""

    def __init__(self, label: str, every_s: float = 10.0) -> None:
        self.label, self.every_s, self.last = label, every_s, 0.0
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s or done == total:
            self.last = now
            elapsed = now - self.start
            eta = elapsed / max(done, 1) * (total - done)
            print(f"[{self.label}] {done}/{total} {name} elapsed {elapsed:.0f}s eta {eta:.0f}s", file=sys.stderr)


def obtain_table(args: argparse.Namespace, backend: Any, space: SearchSpace | None) -> tuple[LatencyTable, float]:
    """The table to evaluate: ``--lut``, or profile ``space`` (resumable) into ``--work``. Checks that the
    backend is the one the table was measured with. Returns the table and the profiling seconds spent now."""
    if args.lut is not None:
        table = LatencyTable.load(args.lut)
        spent = 0.0
    else:
        assert space is not None
        out = args.work / f"lut-{space.name or 'space'}.parquet"
        report = Reporter("profile")
        result = run_sweep(space, backend, out, options=SweepOptions(passes=args.passes),
                           progress=lambda p: report(p.done, p.total, p.name))
        table, spent = result.table, result.seconds
    check_compatible(table.meta, device=backend.device, precision=backend.precision,
                     batch_size=backend.batch_size, backend=backend.name)
    settings = backend.settings()
    if settings != table.meta.settings and not args.allow_settings_mismatch:
        diff = sorted(k for k in set(settings) | set(table.meta.settings)
                      if settings.get(k) != table.meta.settings.get(k))
        raise NvitError(f"the backend's settings differ from the table's ({', '.join(diff)}); pass the same "
                        "options (e.g. --threads) or --allow-settings-mismatch")
    return table, spent


def error_metrics(measured: Any, predicted: Any) -> dict[str, Any]:
    m, p = np.asarray(measured, dtype=float), np.asarray(predicted, dtype=float)
    if m.size == 0:
        return {"n": 0}
    err = (p - m) / m * 100.0
    a = np.abs(err)
    return {"n": int(m.size), "mape_pct": float(a.mean()), "median_abs_pct": float(np.median(a)),
            "p90_abs_pct": float(np.percentile(a, 90)), "max_abs_pct": float(a.max()), "bias_pct": float(err.mean()),
            "within_1pct": float(np.mean(a <= 1)), "within_2pct": float(np.mean(a <= 2)),
            "within_5pct": float(np.mean(a <= 5)), "within_10pct": float(np.mean(a <= 10))}


def context(table: LatencyTable, backend: Any) -> dict[str, Any]:
    meta = table.meta
    return {"created_at": utc_now(), "nvit_version": __version__, "host": platform.node(),
            "device": meta.device_name(), "backend": backend.name, "settings": backend.settings(),
            "versions": backend.versions(), "table_rows": len(table), "table_created_at": meta.created_at,
            "base_arch": meta.base_arch.get("name"), "num_tokens": meta.num_tokens, "batch_size": meta.batch_size,
            "precision": meta.precision.value}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)


# ---- held-out grid points -------------------------------------------------------------------------
GRID_AXES = {PartKind.ATTN: ("embed_dim", "heads", "qk_dim", "v_dim"), PartKind.MLP: ("embed_dim", "mlp_dim"),
             PartKind.FIXED: ("embed_dim",)}


def coarse_values(values: np.ndarray) -> set[int]:
    return {int(v) for v in values[::2]} | {int(values[-1])}


def held_out(table: LatencyTable) -> dict[str, Any]:
    rows = table.rows
    keep = np.ones(len(rows), dtype=bool)
    for kind, axes in GRID_AXES.items():
        is_kind = (rows["kind"] == kind.value).to_numpy()
        inside = np.ones(len(rows), dtype=bool)
        for axis in axes:
            kept = coarse_values(np.unique(rows.loc[is_kind, axis].to_numpy()))
            inside &= rows[axis].isin(kept).to_numpy()
        keep &= ~is_kind | inside
    coarse = LatencyPredictor(table.with_rows(rows[keep]), calibrated=False)
    out: dict[str, Any] = {"kept_rows": int(keep.sum()), "held_out_rows": int((~keep).sum())}
    dropped = rows[~keep]
    for kind in GRID_AXES:
        part = dropped[dropped["kind"] == kind.value]
        if kind is PartKind.ATTN:
            pred = coarse.attn_ms(part["embed_dim"], part["heads"], part["qk_dim"], part["v_dim"])
        elif kind is PartKind.MLP:
            pred = coarse.mlp_ms(part["embed_dim"], part["mlp_dim"])
        else:
            pred = coarse.fixed_ms(part["embed_dim"])
        out[kind.value] = error_metrics(part["latency_ms_median"], pred)
    return out


# ---- off-grid configurations ----------------------------------------------------------------------
def off_grid_configs(table: LatencyTable, per_kind: int, seed: int) -> list[PartConfig]:
    rng = np.random.default_rng(seed)
    rows = table.rows
    axis = {name: np.unique(rows.loc[rows["kind"] != "fixed", name].to_numpy()) for name in
            ("embed_dim", "heads", "qk_dim", "v_dim", "mlp_dim")}
    grid = {name: set(values[values > 0].tolist()) for name, values in axis.items()}

    def width(name: str) -> int:
        values = axis[name][axis[name] > 0]
        lo, hi = int(values.min()), int(values.max())
        if name == "heads":
            return int(rng.integers(lo, hi + 1))
        choices = [w for w in range(lo, hi + 1, ALIGN) if w not in grid[name]] or [lo]
        return int(rng.choice(choices))

    configs: list[PartConfig] = []
    for kind in (PartKind.ATTN, PartKind.MLP, PartKind.BLOCK):
        while sum(c.kind is kind for c in configs) < per_kind:
            e, h, q, v, m = (width(n) for n in ("embed_dim", "heads", "qk_dim", "v_dim", "mlp_dim"))
            widths = {"heads": h, "qk_dim": q, "v_dim": v, "mlp_dim": m}
            c = PartConfig(kind, e, **{n: widths[n] for n in KIND_FIELDS[kind]})
            if c not in configs:
                configs.append(c)
    return configs


def off_grid(table: LatencyTable, backend: Any, per_kind: int, seed: int) -> dict[str, Any]:
    predictor = LatencyPredictor(table, calibrated=False)
    base = ArchSpec.from_dict(table.meta.base_arch)
    configs = off_grid_configs(table, per_kind, seed)
    report = Reporter("off-grid")
    results = []
    for i, c in enumerate(configs):
        measured = backend.measure(part_workload(c, base, table.meta.batch_size)).latency_ms_median
        if c.kind is PartKind.ATTN:
            pred = float(predictor.attn_ms(c.embed_dim, c.heads, c.qk_dim, c.v_dim))
        elif c.kind is PartKind.MLP:
            pred = float(predictor.mlp_ms(c.embed_dim, c.mlp_dim))
        else:
            pred = float(predictor.blocks_ms(c.embed_dim, c.heads, c.qk_dim, c.v_dim, c.mlp_dim))
        results.append({"config": c.key, "kind": c.kind.value, "measured_ms": measured, "predicted_ms": pred})
        report(i + 1, len(configs), c.key)
    out: dict[str, Any] = {"configs": results}
    for kind in (PartKind.ATTN, PartKind.MLP, PartKind.BLOCK):
        sel = [r for r in results if r["kind"] == kind.value]
        out[kind.value] = error_metrics([r["measured_ms"] for r in sel], [r["predicted_ms"] for r in sel])
    return out


# ---- cost -----------------------------------------------------------------------------------------
def cost(table: LatencyTable) -> dict[str, Any]:
    rows = table.rows
    per_kind = {k: float(rows.loc[rows["kind"] == k, "profile_seconds"].mean()) for k in table.counts()
                if table.counts()[k]}
    full = preset_space("deit_small").counts()
    estimate = sum(full[k] * per_kind.get(k, np.mean(list(per_kind.values()))) for k in full)
    return {"table_seconds_total": table.meta.profile_seconds_total,
            "seconds_per_config_mean": float(rows["profile_seconds"].mean()),
            "seconds_per_config_by_kind": per_kind,
            "deit_small_space_configs": full,
            "deit_small_table_estimate_s": float(estimate),
            "calibration_models": 0 if table.meta.calibration is None else len(table.meta.calibration.models)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--offgrid", type=int, default=20, help="Off-grid configurations per kind.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    space = quick_space() if args.quick else resolve_space(args.space)
    per_kind = QUICK_OFFGRID if args.quick else args.offgrid
    try:
        meta = LatencyTable.load(args.lut).meta if args.lut is not None else None
        precision = meta.precision if meta else space.precision
        batch = meta.batch_size if meta else space.batch_size
        with make_backend(args, precision, batch, meta) as backend:
            table, spent = obtain_table(args, backend, None if args.lut else space)
            start = time.perf_counter()
            doc = {"benchmark": "lut_interpolation", "quick": args.quick, "context": context(table, backend),
                   "held_out_grid": held_out(table), "off_grid": off_grid(table, backend, per_kind, args.seed),
                   "cost": {**cost(table), "profiled_now_s": spent}}
            doc["seconds"] = time.perf_counter() - start
    except NvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_json(args.out, doc)
    for section in ("held_out_grid", "off_grid"):
        for kind in ("attn", "mlp", "fixed", "block"):
            m = doc[section].get(kind)
            if m and m.get("n"):
                print(f"{section:>13} {kind:<5} n={m['n']:<3} MAPE {m['mape_pct']:.2f}%  max {m['max_abs_pct']:.2f}%")
    c = doc["cost"]
    print(f"cost: {c['seconds_per_config_mean']:.2f} s/config, table {c['table_seconds_total']:.0f} s, "
          f"deit_small table estimate {c['deit_small_table_estimate_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
