"""Where a latency table has measured, and where an architecture lies relative to that.

A table predicts widths between its grid points by interpolation; outside them it can only extrapolate,
and far outside it says nothing worth a number. :class:`MeasuredGrid` holds the measured values per axis
(``embed_dim``, ``heads``, ``qk_dim``, ``v_dim``, ``mlp_dim``) and the base model's widths;
:meth:`MeasuredGrid.locate` tells, per axis, how many grid steps a spec's widths lie below the smallest or
above the largest measured value:

- ``inside``: every width within the measured range (grid points included);
- ``outside``: extrapolated, at most one grid step above the largest value (any distance below the
  smallest): predicted, with a warning;
- ``far``: more than one grid step above the largest measured value, or above the base model's width:
  refused (:class:`~nvit.errors.LutError`).

One grid step is the spacing of the two outermost values on that side (an axis with a single value uses
the value itself). The pruning engine reads the same grid (:meth:`MeasuredGrid.smallest`) to keep its
widths inside the table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.arch import ArchSpec
from nvit.errors import LutError

#: The axes of a table's grid, in ArchSpec / BlockSpec / table column names.
AXES = ("embed_dim", "heads", "qk_dim", "v_dim", "mlp_dim")
#: More grid steps than this above the largest measured width is refused.
MAX_STEPS_ABOVE = 1.0


class GridStatus(str, enum.Enum):
    INSIDE = "inside"
    OUTSIDE = "outside"
    FAR = "far"


_SEVERITY = {GridStatus.INSIDE: 0, GridStatus.OUTSIDE: 1, GridStatus.FAR: 2}


@dataclass(frozen=True)
class AxisGrid:
    """The measured values of one axis and the base model's widest value on it (``None``: unknown)."""

    name: str
    values: tuple[int, ...]
    base_max: int | None = None

    def __post_init__(self) -> None:
        if not self.values or list(self.values) != sorted(set(self.values)):
            raise LutError(f"grid axis {self.name} needs strictly increasing values, got {list(self.values)}")

    @property
    def smallest(self) -> int:
        return self.values[0]

    @property
    def largest(self) -> int:
        return self.values[-1]

    @property
    def step_below(self) -> int:
        return self.values[1] - self.values[0] if len(self.values) > 1 else self.values[0]

    @property
    def step_above(self) -> int:
        return self.values[-1] - self.values[-2] if len(self.values) > 1 else self.values[-1]

    def locate(self, low: float, high: float) -> AxisExtent:
        """Where widths spanning ``low..high`` lie on this axis."""
        below = max(0.0, (self.smallest - low) / self.step_below)
        above = max(0.0, (high - self.largest) / self.step_above)
        above_base = self.base_max is not None and high > self.base_max
        if above > MAX_STEPS_ABOVE or above_base:
            status = GridStatus.FAR
        elif below > 0 or above > 0:
            status = GridStatus.OUTSIDE
        else:
            status = GridStatus.INSIDE
        return AxisExtent(self.name, self.smallest, self.largest, low, high, below, above, above_base,
                          self.base_max, status)


@dataclass(frozen=True)
class AxisExtent:
    """One axis of :meth:`MeasuredGrid.locate`: the grid's range, the spec's, and the distance in grid steps."""

    axis: str
    grid_min: int
    grid_max: int
    spec_min: float
    spec_max: float
    steps_below: float  # how far the smallest spec width lies below the grid, in grid steps (0: not below)
    steps_above: float  # how far the largest lies above it (0: not above)
    above_base: bool
    base_max: int | None
    status: GridStatus

    def describe(self) -> str:
        """One phrase, e.g. ``mlp_dim 4 is 0.08 grid steps below the smallest measured 8``."""
        parts = []
        if self.steps_below > 0:
            parts.append(f"{self.axis} {_num(self.spec_min)} is {self.steps_below:.2g} grid step(s) below the "
                         f"smallest measured {self.grid_min}")
        if self.steps_above > 0:
            parts.append(f"{self.axis} {_num(self.spec_max)} is {self.steps_above:.3g} grid step(s) above the "
                         f"largest measured {self.grid_max}")
        if self.above_base:
            parts.append(f"{self.axis} {_num(self.spec_max)} is above the base model's {self.base_max}")
        return "; ".join(parts) or f"{self.axis} inside {self.grid_min}..{self.grid_max}"

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "grid_min": self.grid_min, "grid_max": self.grid_max,
                "spec_min": _num(self.spec_min), "spec_max": _num(self.spec_max),
                "steps_below": self.steps_below, "steps_above": self.steps_above,
                "above_base": self.above_base, "status": self.status.value}


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


@dataclass(frozen=True)
class GridReport:
    """Where a spec lies on every axis of a table's grid; ``status`` is the worst axis's."""

    extents: tuple[AxisExtent, ...]

    @property
    def status(self) -> GridStatus:
        return max((e.status for e in self.extents), key=_SEVERITY.__getitem__, default=GridStatus.INSIDE)

    @property
    def inside(self) -> bool:
        return self.status is GridStatus.INSIDE

    def outside(self) -> list[AxisExtent]:
        return [e for e in self.extents if e.status is not GridStatus.INSIDE]

    def axis(self, name: str) -> AxisExtent:
        for e in self.extents:
            if e.axis == name:
                return e
        raise KeyError(name)

    def describe(self) -> str:
        return "; ".join(e.describe() for e in self.outside()) or "inside the measured grid"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "axes": {e.axis: e.to_dict() for e in self.extents}}


@dataclass(frozen=True)
class MeasuredGrid:
    """The widths a table measured, per axis (see the module doc)."""

    axes: tuple[AxisGrid, ...]

    @classmethod
    def from_values(cls, values: Mapping[str, Sequence[int]], base: ArchSpec | None = None) -> MeasuredGrid:
        unknown = sorted(set(values) - set(AXES))
        if unknown:
            raise LutError(f"unknown grid axis name(s): {', '.join(unknown)}")
        base_max = _base_widths(base) if base is not None else {}
        return cls(tuple(AxisGrid(name, tuple(int(v) for v in sorted(set(values[name]))), base_max.get(name))
                         for name in AXES if name in values))

    @classmethod
    def from_table(cls, table: Any) -> MeasuredGrid:
        """From a :class:`~nvit.lut.table.LatencyTable` (its attention, MLP and fixed-part grids and base)."""
        from nvit.lut.rows import grid_axes
        from nvit.vocab import PartKind

        attn = grid_axes(table.rows, PartKind.ATTN)
        mlp = grid_axes(table.rows, PartKind.MLP)
        fixed = grid_axes(table.rows, PartKind.FIXED)
        # Every embedding width the three interpolators share: each is only measured on its own range.
        embed = sorted(set(attn["embed_dim"].tolist()) & set(mlp["embed_dim"].tolist())
                       & set(fixed["embed_dim"].tolist())) or attn["embed_dim"].tolist()
        values = {"embed_dim": embed, "heads": attn["heads"].tolist(), "qk_dim": attn["qk_dim"].tolist(),
                  "v_dim": attn["v_dim"].tolist(), "mlp_dim": mlp["mlp_dim"].tolist()}
        return cls.from_values(values, _table_base(table.meta))

    def axis(self, name: str) -> AxisGrid:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(f"no grid axis {name!r}; axes: {', '.join(a.name for a in self.axes)}")

    def values(self, name: str) -> tuple[int, ...]:
        """The measured values of an axis (``embed_dim``, ``heads``, ``qk_dim``, ``v_dim``, ``mlp_dim``)."""
        return self.axis(name).values

    def smallest(self, name: str) -> int:
        return self.axis(name).smallest

    def largest(self, name: str) -> int:
        return self.axis(name).largest

    def to_dict(self) -> dict[str, list[int]]:
        return {a.name: list(a.values) for a in self.axes}

    def locate(self, spec: ArchSpec) -> GridReport:
        """Where ``spec``'s widths lie relative to the grid, per axis."""
        widths = _spec_widths(spec)
        return GridReport(tuple(a.locate(float(np.min(widths[a.name])), float(np.max(widths[a.name])))
                                if widths[a.name].size else a.locate(a.smallest, a.smallest) for a in self.axes))

    def check(self, spec: ArchSpec, *, what: str = "the architecture") -> GridReport:
        """:meth:`locate`, raising :class:`LutError` when ``spec`` lies far outside."""
        report = self.locate(spec)
        if report.status is GridStatus.FAR:
            far = "; ".join(e.describe() for e in report.extents if e.status is GridStatus.FAR)
            raise LutError(f"{what} lies far outside the latency table's measured grid ({far}); the table "
                           "cannot predict it: profile a table whose space covers these widths")
        return report


def _table_base(meta: Any) -> Any:
    """What a table's grid is judged against: its base ViT, or the stage a Swin table's stage measured (a
    :class:`~nvit.swin.SwinStage`: its width and blocks)."""
    if not meta.base_arch:
        return None
    if meta.base_arch.get("kind") == "swin":
        from nvit.swin import SwinSpec

        return SwinSpec.from_dict(meta.base_arch).stages[int(meta.space.get("stage", 0))]
    return ArchSpec.from_dict(meta.base_arch)


def _spec_widths(spec: ArchSpec) -> dict[str, np.ndarray]:
    """Widths per axis over the blocks that have the sub-layer (a removed one has no width to locate)."""
    out = {"embed_dim": np.array([spec.embed_dim], dtype=np.float64)}
    for name in AXES[1:]:
        present = (lambda b: b.has_mlp) if name == "mlp_dim" else (lambda b: b.has_attn)
        out[name] = np.array([getattr(b, name) for b in spec.blocks if present(b)], dtype=np.float64)
    return out


def _base_widths(base: ArchSpec) -> dict[str, int]:
    return {name: int(np.max(w)) for name, w in _spec_widths(base).items() if w.size}
