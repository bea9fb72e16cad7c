"""The rows of a latency table: typed columns whose names carry their units, and the checks on them.

Rows are :class:`~nvit.vocab.PartConfig` measurements (``attn``, ``mlp``, ``block``, ``fixed``).
The attention and MLP rows must each fill a rectangular grid (:func:`coverage_problems`) for the predictor
to interpolate; :func:`grid_axes` says which widths a table measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from nvit.errors import LutError
from nvit.vocab import KIND_FIELDS, WIDTH_FIELDS, PartConfig, PartKind

if TYPE_CHECKING:
    from nvit.lut.meta import LutMeta

#: Column name -> pandas dtype. Widths a row's kind does not use are 0.
COLUMNS: dict[str, str] = {
    "kind": "string",
    "embed_dim": "int32",
    "heads": "int32",
    "qk_dim": "int32",
    "v_dim": "int32",
    "mlp_dim": "int32",
    "latency_ms_median": "float64",
    "latency_ms_mean": "float64",
    "latency_ms_p10": "float64",
    "latency_ms_p90": "float64",
    "latency_ms_p99": "float64",
    "latency_ms_std": "float64",
    "cov": "float64",
    "ci95_halfwidth_ms": "float64",
    "n_samples": "int64",
    "n_repeats": "int32",
    "repeat_rel_spread": "float64",
    "stop_reason": "string",
    "sentinel_drift": "float64",  # sentinel latency / its first latency - 1, as last re-timed before this row
    "sweep_index": "int32",  # position in the (randomised) measurement order
    "profile_seconds": "float64",  # wall time spent on this row: export, session, warm-up and timing
    "measured_at": "datetime64[us, UTC]",
}
KEY_COLUMNS = ("kind", "embed_dim", *WIDTH_FIELDS)
LATENCY_COLUMN = "latency_ms_median"


def row_key(kind: str, embed_dim: int, heads: int, qk_dim: int, v_dim: int, mlp_dim: int) -> str:
    return PartConfig(PartKind(kind), int(embed_dim), int(heads), int(qk_dim), int(v_dim), int(mlp_dim)).key


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in COLUMNS.items()})


def rows_from_records(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """A typed row frame from dicts holding every column (``measured_at`` as an ISO string or datetime)."""
    records = list(records)
    if not records:
        return empty_rows()
    frame = pd.DataFrame.from_records(records)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise LutError(f"LUT rows lack column(s): {', '.join(missing)}")
    frame = frame[list(COLUMNS)]
    frame["measured_at"] = pd.to_datetime(frame["measured_at"], utc=True)
    return frame.astype(COLUMNS)


def normalise_rows(rows: pd.DataFrame) -> pd.DataFrame:
    extra = [c for c in rows.columns if c not in COLUMNS]
    if extra:
        raise LutError(f"unexpected LUT column(s): {', '.join(extra)}")
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise LutError(f"missing LUT column(s): {', '.join(missing)}")
    rows = rows[list(COLUMNS)].copy()
    if not isinstance(rows["measured_at"].dtype, pd.DatetimeTZDtype):
        rows["measured_at"] = pd.to_datetime(rows["measured_at"], utc=True)
    rows = rows.astype(COLUMNS)
    return rows.sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)


def validate_rows(rows: pd.DataFrame, meta: LutMeta, *, coverage: bool = True) -> list[str]:
    """Row-level checks, and with ``coverage`` the complete grids the predictor needs."""
    problems: list[str] = []
    if rows.empty:
        return ["the table has no rows"]
    kinds = set(rows["kind"].astype(str))
    bad_kinds = sorted(kinds - {k.value for k in PartKind})
    if bad_kinds:
        return [f"unknown row kind(s): {', '.join(bad_kinds)}"]
    latency_cols = [c for c in COLUMNS if c.startswith("latency_ms_") and c != "latency_ms_std"]
    values = rows[latency_cols].to_numpy(dtype=float)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        problems.append("latencies must be finite and positive")
    for kind in PartKind:
        part = rows[rows["kind"] == kind.value]
        for name in WIDTH_FIELDS:
            used = name in KIND_FIELDS[kind]
            col = part[name].to_numpy()
            if used and np.any(col <= 0):
                problems.append(f"{kind.value} rows need a positive {name}")
            if not used and np.any(col != 0):
                problems.append(f"{kind.value} rows must have {name} = 0")
    if np.any(rows["embed_dim"].to_numpy() <= 0):
        problems.append("embed_dim must be positive")
    dup = rows.duplicated(list(KEY_COLUMNS))
    if dup.any():
        first = rows[dup].iloc[0]
        problems.append(f"{int(dup.sum())} duplicate configuration(s), e.g. "
                        f"{row_key(*(first[c] for c in KEY_COLUMNS))}")
    if coverage:
        problems += coverage_problems(rows.drop_duplicates(list(KEY_COLUMNS)))
    return problems


def grid_axes(rows: pd.DataFrame, kind: PartKind) -> dict[str, np.ndarray]:
    part = rows[rows["kind"] == kind.value]
    return {name: np.unique(part[name].to_numpy()) for name in ("embed_dim", *KIND_FIELDS[kind])}


def coverage_problems(rows: pd.DataFrame) -> list[str]:
    """The attention and MLP rows must each fill a rectangular grid; fixed parts must cover every ``e``."""
    problems: list[str] = []
    for kind in (PartKind.ATTN, PartKind.MLP):
        axes = grid_axes(rows, kind)
        expected = int(np.prod([len(v) for v in axes.values()]))
        have = int((rows["kind"] == kind.value).sum())
        if have == 0:
            problems.append(f"no {kind.value} rows")
        elif have != expected:
            shape = " x ".join(str(len(v)) for v in axes.values())
            problems.append(f"{kind.value} grid is incomplete: {have} of {expected} points ({shape})")
    fixed_e = set(rows.loc[rows["kind"] == PartKind.FIXED.value, "embed_dim"].tolist())
    if not fixed_e:
        problems.append("no fixed-part rows")
    return problems
