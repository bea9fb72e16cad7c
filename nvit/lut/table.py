"""Latency lookup tables: one Parquet file, one row per measured configuration, metadata in the schema.

:class:`LatencyTable` holds typed rows (:mod:`nvit.lut.rows`) and their metadata (:mod:`nvit.lut.meta`),
reads and writes them atomically, and merges shards of one space (:func:`merge_tables`). The names of
both modules are re-exported here, so ``nvit.lut.table`` stays the one import for table users.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from nvit.errors import LutError
from nvit.fileio import atomic_path
from nvit.lut.meta import (
    LUT_FILE_KIND,
    LUT_SCHEMA_VERSION,
    META_KEY,
    LutMeta,
    check_compatible,
    differing_keys,
    utc_now,
)
from nvit.lut.rows import (
    COLUMNS,
    KEY_COLUMNS,
    LATENCY_COLUMN,
    coverage_problems,
    empty_rows,
    grid_axes,
    normalise_rows,
    row_key,
    rows_from_records,
    validate_rows,
)
from nvit.vocab import PartKind

__all__ = [
    "COLUMNS", "KEY_COLUMNS", "LATENCY_COLUMN", "LUT_FILE_KIND", "LUT_SCHEMA_VERSION", "META_KEY",
    "LatencyTable", "LutMeta", "check_compatible", "coverage_problems", "empty_rows", "grid_axes",
    "merge_tables", "row_key", "rows_from_records", "utc_now", "validate_rows",
]

logger = logging.getLogger(__name__)


class LatencyTable:
    """A LUT in memory: typed rows and metadata. Rows are kept sorted by configuration."""

    #: A Swin table (:class:`~nvit.lut.swin_table.SwinLatencyTable`) says True.
    is_swin = False

    def __init__(self, rows: pd.DataFrame, meta: LutMeta) -> None:
        self.rows = normalise_rows(rows)
        self.meta = meta

    @property
    def stage_tables(self) -> tuple[LatencyTable, ...]:
        """The tables of rows this table holds: itself (a Swin table has one per stage)."""
        return (self,)

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
        if (path / "swin_table.json").is_file():
            raise LutError(f"{path} is a Swin latency table (a .swinlut folder): nvit prune, compare and lut "
                           "show/validate read it; this command reads a ViT table's Parquet file")
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
            diff = differing_keys(a, b)
            if diff:
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
