"""Latency lookup tables and the predictor built on them.

``nvit.lut.base`` (the predictor interface) is light; the table and the LUT predictor need pandas and are
imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvit.lut.predictor import LatencyPredictor
    from nvit.vocab import DeviceKind, Precision

__all__ = ["LatencyPredictor", "LatencyTable", "check_compatible", "load_predictor", "load_table"]

_LAZY = {
    "LatencyPredictor": "nvit.lut.predictor",
    "LatencyTable": "nvit.lut.table",
    "check_compatible": "nvit.lut.table",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nvit.lut' has no attribute {name!r}")


def load_table(path: str | os.PathLike[str]) -> Any:
    """Read and validate a latency table (:class:`~nvit.lut.table.LatencyTable`)."""
    from nvit.lut.table import LatencyTable

    return LatencyTable.load(path)


def load_predictor(
    path: str | os.PathLike[str],
    device: str | DeviceKind | None = None,
    precision: str | Precision | None = None,
    batch_size: int | None = None,
) -> LatencyPredictor:
    """A :class:`~nvit.lut.predictor.LatencyPredictor` from a table file, refusing a table measured on
    another device (kind or name), precision or batch size than asked for (``None``: accept the table's)."""
    from nvit.lut.predictor import LatencyPredictor
    from nvit.lut.table import LatencyTable, check_compatible

    table = LatencyTable.load(path)
    check_compatible(table.meta, device=device, precision=precision, batch_size=batch_size,
                     source=f"latency table {path}")
    return LatencyPredictor(table)
