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

__all__ = ["LatencyPredictor", "LatencyTable", "check_compatible", "load_predictor", "load_table", "predictor_for"]

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
    """Read and validate a latency table (:class:`~nvit.lut.table.LatencyTable`, or a Swin table folder:
    :class:`~nvit.lut.swin_table.SwinLatencyTable`)."""
    from nvit.lut.swin_table import SwinLatencyTable, is_swin_table
    from nvit.lut.table import LatencyTable

    return SwinLatencyTable.load(path) if is_swin_table(path) else LatencyTable.load(path)


def predictor_for(table: Any, *, calibrated: bool = True) -> Any:
    """The predictor of a loaded table: a ViT table's or a Swin table's."""
    from nvit.lut.predictor import LatencyPredictor
    from nvit.lut.swin_table import SwinLatencyPredictor, SwinLatencyTable

    cls = SwinLatencyPredictor if isinstance(table, SwinLatencyTable) else LatencyPredictor
    return cls(table, calibrated=calibrated)


def load_predictor(
    path: str | os.PathLike[str],
    device: str | DeviceKind | None = None,
    precision: str | Precision | None = None,
    batch_size: int | None = None,
) -> LatencyPredictor:
    """A :class:`~nvit.lut.predictor.LatencyPredictor` from a table file (a Swin table folder gives a
    :class:`~nvit.lut.swin_table.SwinLatencyPredictor`), refusing a table measured on
    another device (kind or name), precision or batch size than asked for (``None``: accept the table's)."""
    from nvit.lut.predictor import LatencyPredictor
    from nvit.lut.swin_table import is_swin_table, load_swin_predictor
    from nvit.lut.table import LatencyTable, check_compatible

    if is_swin_table(path):
        return load_swin_predictor(path, device=device, precision=precision, batch_size=batch_size)
    table = LatencyTable.load(path)
    check_compatible(table.meta, device=device, precision=precision, batch_size=batch_size,
                     source=f"latency table {path}")
    return LatencyPredictor(table)
