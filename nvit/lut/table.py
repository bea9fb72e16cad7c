"""Latency lookup tables: one Parquet file, one row per measured configuration, metadata in the schema.

Rows are :class:`~nvit.profiler.space.PartConfig` measurements (``attn``, ``mlp``, ``block``, ``fixed``)
with typed columns whose names carry their units. The table's identity (backend, device, precision, batch,
tokens) and its provenance (device fingerprint, package versions, protocol, sentinel drift, calibration)
live in :class:`LutMeta`, stored as JSON under the Parquet schema metadata key ``nvit.lut``. A table from
other conditions than a command needs is an error (:func:`check_compatible`), never a silent mismatch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nvit import __version__
from nvit.errors import LutError
from nvit.fileio import atomic_path
from nvit.profiler.base import DeviceKind, Precision
from nvit.profiler.space import KIND_FIELDS, WIDTH_FIELDS, PartConfig, PartKind

logger = logging.getLogger(__name__)

LUT_SCHEMA_VERSION = 1
LUT_FILE_KIND = "nvit.lut"
META_KEY = b"nvit.lut"

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


@dataclass(frozen=True)
class LutMeta:
    """Everything that identifies a table and how it was made. ``device`` is a fingerprint dict
    (:class:`~nvit.profiler.device.DeviceFingerprint.to_dict`), ``device_identity`` the part of it that
    must match between tables."""

    backend: str
    device_kind: DeviceKind
    precision: Precision
    batch_size: int
    num_tokens: int
    base_arch: dict[str, Any]
    device_identity: dict[str, Any]
    device: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    sentinel: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    profile_seconds_total: float = 0.0
    created_at: str = ""
    nvit_version: str = __version__
    schema_version: int = LUT_SCHEMA_VERSION
    kind: str = LUT_FILE_KIND

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "device_kind", DeviceKind(self.device_kind))
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError as exc:
            raise LutError(f"LUT metadata: {exc}") from None
        for key in ("batch_size", "num_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LutError(f"LUT metadata: {key} must be a positive integer, got {value!r}")
        if not self.created_at:
            object.__setattr__(self, "created_at", utc_now())

    def identity(self) -> dict[str, Any]:
        """What two tables must share to be merged, or a table and a command to be used together."""
        return {"backend": self.backend, "device_kind": self.device_kind.value, "precision": self.precision.value,
                "batch_size": self.batch_size, "num_tokens": self.num_tokens, "device": self.device_identity}

    def device_name(self) -> str:
        ident = self.device_identity
        return str(ident.get("gpu") or ident.get("cpu") or self.device_kind.value)

    def replace(self, **changes: Any) -> LutMeta:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["device_kind"] = self.device_kind.value
        out["precision"] = self.precision.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LutMeta:
        if not isinstance(data, Mapping):
            raise LutError("LUT metadata must be a JSON object")
        if data.get("kind") != LUT_FILE_KIND:
            raise LutError(f"not an nvit latency table (kind {data.get('kind')!r})")
        version = data.get("schema_version")
        if version != LUT_SCHEMA_VERSION:
            raise LutError(f"unsupported LUT schema_version {version!r} (this nvit reads {LUT_SCHEMA_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LutError(f"unknown LUT metadata key(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise LutError(f"LUT metadata is incomplete: {exc}") from None


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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


class LatencyTable:
    """A LUT in memory: typed rows and metadata. Rows are kept sorted by configuration."""

    def __init__(self, rows: pd.DataFrame, meta: LutMeta) -> None:
        self.rows = _normalise(rows)
        self.meta = meta

    # ---- queries -------------------------------------------------------------------------------
    def of_kind(self, kind: PartKind | str) -> pd.DataFrame:
        return self.rows[self.rows["kind"] == PartKind(kind).value]

    def keys(self) -> set[str]:
        return {row_key(*r) for r in self.rows[list(KEY_COLUMNS)].itertuples(index=False)}

    def counts(self) -> dict[str, int]:
        return {k.value: int((self.rows["kind"] == k.value).sum()) for k in PartKind}

    def with_rows(self, rows: pd.DataFrame) -> LatencyTable:
        return LatencyTable(rows, self.meta)

    def with_meta(self, **changes: Any) -> LatencyTable:
        return LatencyTable(self.rows, self.meta.replace(**changes))

    def __len__(self) -> int:
        return len(self.rows)

    # ---- checks --------------------------------------------------------------------------------
    def problems(self, *, coverage: bool = True) -> list[str]:
        """Everything wrong with this table, one line each (empty when it is valid). Without ``coverage``
        only the rows themselves are checked: a shard of a space is valid but cannot predict alone."""
        return validate_rows(self.rows, self.meta, coverage=coverage)

    def validate(self, *, coverage: bool = True) -> LatencyTable:
        found = self.problems(coverage=coverage)
        if found:
            more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
            raise LutError(f"invalid latency table: {found[0]}{more}")
        return self

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table atomically (a reader never sees a partial file)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        arrow = pa.Table.from_pandas(self.rows, preserve_index=False)
        meta = dict(arrow.schema.metadata or {})
        meta[META_KEY] = json.dumps(self.meta.to_dict(), sort_keys=True).encode()
        arrow = arrow.replace_schema_metadata(meta)
        with atomic_path(path) as tmp:
            pq.write_table(arrow, tmp)
        logger.info("wrote latency table %s (%d rows)", path, len(self.rows))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, validate: bool = True) -> LatencyTable:
        """Read a table; a missing, corrupt or invalid file is one :class:`LutError` line. Grid coverage is
        not required here (shards are partial); the predictor checks it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise LutError(f"latency table not found: {path}")
        try:
            arrow = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LutError(f"{path} is not a readable Parquet latency table ({first})") from None
        raw = (arrow.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise LutError(f"{path} is a Parquet file without nvit LUT metadata")
        try:
            meta_dict = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LutError(f"{path}: the LUT metadata is not valid JSON") from None
        try:
            meta = LutMeta.from_dict(meta_dict)
        except LutError as exc:
            raise LutError(f"{path}: {exc}") from None
        frame = arrow.to_pandas()
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise LutError(f"{path}: missing column(s) {', '.join(missing)}")
        try:
            table = cls(frame, meta)
        except (ValueError, TypeError) as exc:
            raise LutError(f"{path}: a column has the wrong type ({exc})") from None
        if validate:
            found = table.problems(coverage=False)
            if found:
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                raise LutError(f"{path}: {found[0]}{more}")
        return table


def _normalise(rows: pd.DataFrame) -> pd.DataFrame:
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


def check_compatible(
    meta: LutMeta,
    *,
    device: str | DeviceKind | None = None,
    precision: Precision | str | None = None,
    batch_size: int | None = None,
    num_tokens: int | None = None,
    backend: str | None = None,
    source: str = "the latency table",
) -> None:
    """Raise :class:`LutError` when the table was measured under other conditions than asked for.

    ``device`` is a device kind (``cpu``/``cuda``) or a device name (matched case-insensitively against the
    fingerprint, e.g. ``"NVIDIA H100 80GB HBM3"``); ``None`` means "any".
    """
    checks: list[tuple[str, Any, Any]] = []
    if device is not None:
        wanted = device.value if isinstance(device, DeviceKind) else str(device)
        if wanted.lower() in {k.value for k in DeviceKind}:
            checks.append(("device", meta.device_kind.value, wanted.lower()))
        elif wanted.lower() != meta.device_name().lower():
            checks.append(("device", meta.device_name(), wanted))
    if precision is not None:
        try:
            checks.append(("precision", meta.precision.value, Precision(precision).value))
        except ValueError:
            raise LutError(f"unknown precision {precision!r}; known: {', '.join(p.value for p in Precision)}") from None
    if batch_size is not None:
        checks.append(("batch size", meta.batch_size, batch_size))
    if num_tokens is not None:
        checks.append(("token count", meta.num_tokens, num_tokens))
    if backend is not None:
        checks.append(("backend", meta.backend, backend))
    for what, have, want in checks:
        if have != want:
            raise LutError(f"{source} was measured with {what} {have}, but {want} is needed "
                           f"(profile a table for {want}, or override the check)")


def merge_tables(tables: Sequence[LatencyTable]) -> LatencyTable:
    """One table from shards of the same space measured on the same kind of device.

    Tables must share identity (backend, device, precision, batch, tokens), base architecture and settings;
    duplicate configurations keep the first table's row. Calibration is kept only if every input has the
    same one (re-calibrate after merging shards).
    """
    if not tables:
        raise LutError("nothing to merge")
    first = tables[0].meta
    for i, t in enumerate(tables[1:], start=1):
        for what, a, b in (("identity", first.identity(), t.meta.identity()),
                           ("base architecture", first.base_arch, t.meta.base_arch),
                           ("backend settings", first.settings, t.meta.settings)):
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise LutError(f"cannot merge table {i} into table 0: different {what} ({', '.join(diff)})")
        if t.meta.versions != first.versions:
            logger.warning("merging tables measured with different package versions: %s vs %s",
                           first.versions, t.meta.versions)
    rows = pd.concat([t.rows for t in tables], ignore_index=True)
    dup = rows.duplicated(list(KEY_COLUMNS), keep="first")
    if dup.any():
        logger.warning("merge: %d configuration(s) measured twice, keeping the first", int(dup.sum()))
    rows = rows[~dup]
    calibrations = [t.meta.calibration for t in tables]
    calibration = first.calibration if all(c == calibrations[0] for c in calibrations) else None
    if calibration is None and any(c is not None for c in calibrations):
        logger.warning("merge: the inputs have different calibrations; the merged table is uncalibrated")
    sentinel = [dict(s, table=i) for i, t in enumerate(tables) for s in t.meta.sentinel]
    meta = first.replace(
        sentinel=sentinel, calibration=calibration, created_at=utc_now(),
        profile_seconds_total=float(sum(t.meta.profile_seconds_total for t in tables)),
        protocol={**first.protocol, "merged_from": len(tables)},
    )
    return LatencyTable(rows, meta)
