"""The LUT-backed latency predictor: any architecture's latency from a table of measured parts.

Model of one block at embedding width ``e`` (all terms interpolated from the table)::

    block(e, h, q, v, m) = slope · (attn(e, h, q, v) + mlp(e, m)) + overhead(e)

``attn`` and ``mlp`` are multilinear interpolations over the measured grids (exact on grid points, linear
extrapolation outside, floored at 0). Multilinear is the natural choice: a block's FLOPs are multilinear
in its widths, so the interpolation only has to absorb how efficiency changes with size. ``slope`` and
``overhead(e)`` are the interaction measured on full blocks of every size (a block is one call instead of
two, and its halves share the caches): :mod:`nvit.lut.interaction`.

A block the table measured (a full or one-half block row, such as the narrow shapes pruning reaches) is priced
by its own row instead: :mod:`nvit.lut.measured_blocks`.

A block that kept one sub-layer only (pruning removed the other) is priced from the table's measured
one-half blocks (``attn_block`` / ``mlp_block`` rows): ``one_half = slope' · half + overhead'(e)``, one such
interaction per sub-layer fitted like the full-block one, so the price of removing a sub-layer is the
measured drop ``block − one_half``, never an extrapolation of the half to zero width. A table without those
rows predicts width-only architectures as before and refuses one with a removed sub-layer
(:attr:`LatencyPredictor.removal_unavailable`). A block with neither sub-layer is not in the architecture.

Whole model: ``scale · (Σ blocks + fixed(e)) + offset``. A block timed alone keeps its weights in cache
and pays one call overhead of its own; in a whole model it does neither. ``scale`` and ``offset`` are fitted
by least squares on a few whole-model measurements (:func:`fit_calibration`; the profiler measures them:
:func:`nvit.profiler.selfcheck.calibrate`) and stored in the table; an
uncalibrated table uses 1 and 0.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from nvit.arch import ArchSpec, BlockSpec, WidthSteps
from nvit.errors import LutError
from nvit.lut.base import UNIT_STEPS, LatencyDeltas, Predictor
from nvit.lut.calibration import (  # noqa: F401  (fit_calibration, MIN_SCALE_SPREAD, SCALE_BOUNDS: public here too)
    MIN_SCALE_SPREAD,
    SCALE_BOUNDS,
    Composition,
    Floors,
    apply_stored,
    fit_calibration,
)
from nvit.lut.coverage import GridReport, GridStatus, MeasuredGrid
from nvit.lut.interaction import BlockInteraction
from nvit.lut.measured_blocks import MeasuredBlocks
from nvit.lut.table import LATENCY_COLUMN, LatencyTable, check_compatible
from nvit.vocab import ONE_HALF_BLOCKS, PartKind

logger = logging.getLogger(__name__)

#: Arch fields the fixed parts were measured with; a spec that differs cannot be predicted by the table.
FIXED_PART_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "distilled")
_STEP_FIELDS = {"heads": "heads", "qk": "qk_dim", "v": "v_dim", "mlp": "mlp_dim"}


class GridInterpolator:
    """Multilinear interpolation over a rectangular grid, linear extrapolation outside it.

    An axis with one point is constant along that axis. Exact on grid points.
    """

    def __init__(self, axes: Sequence[np.ndarray], values: np.ndarray) -> None:
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.shape != tuple(len(a) for a in self.axes):
            raise LutError(f"grid values of shape {self.values.shape} do not match the axes")

    def __call__(self, *coords: Any) -> np.ndarray:
        coords = np.broadcast_arrays(*(np.asarray(c, dtype=np.float64) for c in coords))
        lows, fracs = [], []
        for axis, x in zip(self.axes, coords, strict=True):
            if len(axis) == 1:
                lows.append(np.zeros(x.shape, dtype=np.intp))
                fracs.append(np.zeros(x.shape))
                continue
            i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
            lows.append(i)
            fracs.append((x - axis[i]) / (axis[i + 1] - axis[i]))
        out = np.zeros(coords[0].shape)
        for corner in itertools.product((0, 1), repeat=len(self.axes)):
            weight = np.ones(coords[0].shape)
            index = []
            for d, up in enumerate(corner):
                weight = weight * (fracs[d] if up else 1.0 - fracs[d])  # a one-point axis has frac 0
                index.append(lows[d] + (up if len(self.axes[d]) > 1 else 0))
            out = out + weight * self.values[tuple(index)]
        return out


def _grid(rows: Any, axes: Sequence[str]) -> GridInterpolator:
    grid_axes = [np.unique(rows[a].to_numpy()) for a in axes]
    values = np.full(tuple(len(a) for a in grid_axes), np.nan)
    index = tuple(np.searchsorted(g, rows[a].to_numpy()) for g, a in zip(grid_axes, axes, strict=True))
    values[index] = rows[LATENCY_COLUMN].to_numpy(dtype=float)
    if np.isnan(values).any():
        raise LutError(f"the {rows['kind'].iloc[0]} grid is incomplete; run 'nvit lut validate'")
    return GridInterpolator(grid_axes, values)


class LatencyPredictor(Predictor):
    """Latency of any architecture from a :class:`~nvit.lut.table.LatencyTable` (see the module doc).

    With ``calibrated=False`` the stored calibration is ignored (scale 1, offset 0): what :func:`calibrate`
    fits against. A stored calibration that would price a part of the table's space below its floor is
    refused (:attr:`calibration_refused` says why) and the parts alone predict.
    """

    def __init__(self, table: LatencyTable, *, calibrated: bool = True) -> None:
        table.validate()
        self.table = table
        self.meta = table.meta
        rows = table.rows
        self._attn = _grid(table.of_kind(PartKind.ATTN), ("embed_dim", "heads", "qk_dim", "v_dim"))
        self._mlp = _grid(table.of_kind(PartKind.MLP), ("embed_dim", "mlp_dim"))
        fixed = table.of_kind(PartKind.FIXED)
        self._fixed = GridInterpolator([fixed["embed_dim"].to_numpy()], fixed[LATENCY_COLUMN].to_numpy())
        blocks = rows[rows["kind"] == PartKind.BLOCK.value]
        halves = self._halves(*(blocks[c].to_numpy() for c in ("embed_dim", "heads", "qk_dim", "v_dim", "mlp_dim")))
        self.interaction = BlockInteraction.fit(blocks["embed_dim"].to_numpy(), halves,
                                                blocks[LATENCY_COLUMN].to_numpy(dtype=float))
        self.one_half: dict[PartKind, BlockInteraction] = {}
        for kind, half in ONE_HALF_BLOCKS.items():
            part = table.of_kind(kind)
            if len(part):
                e = part["embed_dim"].to_numpy()
                half_ms = (self.attn_ms(e, *(part[c].to_numpy() for c in ("heads", "qk_dim", "v_dim")))
                           if half is PartKind.ATTN else self.mlp_ms(e, part["mlp_dim"].to_numpy()))
                self.one_half[kind] = BlockInteraction.fit(e, half_ms, part[LATENCY_COLUMN].to_numpy(dtype=float))
        self.measured_blocks = MeasuredBlocks.from_rows(rows, LATENCY_COLUMN)
        self.grid = MeasuredGrid.from_table(table)
        self.warn_outside = True  # log extrapolation (a caller that reports the grid itself turns it off)
        self._warned: set[tuple[str, bool, bool]] = set()
        applied = apply_stored(table.meta.calibration if calibrated else None, self._space_floors())
        self.floors, self.calibration_refused, self.calibrated = applied.floors, applied.refused, applied.calibrated
        self.scale, self._offset_ms, self.per_block_ms = applied.scale, applied.offset_ms, applied.per_block_ms

    def _space_floors(self) -> Floors:
        """The smallest raw block (full or one-half) and fixed part of the table's space. The parts are
        multilinear between grid points and a block is increasing in its halves, so the smallest sits at the
        smallest widths of some measured embedding width."""
        embeds = self._attn.axes[0]
        attn_min = np.maximum(self._attn.values.reshape(len(embeds), -1).min(axis=1), 0.0)
        mlp_e = self._mlp.axes[0]
        mlp_min = np.maximum(np.interp(embeds, mlp_e, self._mlp.values.reshape(len(mlp_e), -1).min(axis=1)), 0.0)
        candidates = [self.interaction(embeds, attn_min + mlp_min)]
        for kind, half in ((PartKind.ATTN_BLOCK, attn_min), (PartKind.MLP_BLOCK, mlp_min)):
            if kind in self.one_half:
                candidates.append(self.one_half[kind](embeds, half))
        if self.measured_blocks.smallest_ms is not None:
            candidates.append(np.array([self.measured_blocks.smallest_ms]))
        block = float(np.min(np.concatenate(candidates)))
        fixed = float(np.min(np.maximum(self._fixed.values, 0.0)))
        return Floors(block_ms=block, fixed_ms=fixed)

    def floors_for(self, archs: Sequence[ArchSpec]) -> Floors:
        """The space's floors, lowered to the smallest raw parts of ``archs`` (calibration models may lie
        below the grid): what a calibration fitted on ``archs`` is bounded by and stores."""
        floors = self.floors
        for spec in archs:
            raw = self._raw_blocks_ms(spec.embed_dim, *self._widths(spec))
            floors = floors.lowered(float(np.nanmin(raw)), float(np.maximum(self._fixed(spec.embed_dim), 0.0)))
        return floors

    def raw_block_latencies_ms(self, spec: ArchSpec) -> np.ndarray:
        """``spec``'s blocks priced from the parts alone (no calibration)."""
        return self._raw_blocks_ms(spec.embed_dim, *self._widths(spec))

    def composition(self, spec: ArchSpec, floors: Floors | None = None) -> Composition:
        """``spec`` as the calibration sees it: raw sum of parts and the shares of its parts (uncalibrated
        prices, whatever this predictor's calibration)."""
        floors = floors or self.floors
        raw = self.raw_block_latencies_ms(spec)
        fixed = float(np.maximum(self._fixed(spec.embed_dim), 0.0))
        return Composition(raw_ms=float(raw.sum()) + fixed, blocks=float(floors.block_share(raw).sum()),
                           fixed=float(floors.fixed_share(fixed)))

    # ---- parts (vectorised) --------------------------------------------------------------------
    def attn_ms(self, e: Any, h: Any, q: Any, v: Any) -> np.ndarray:
        return np.maximum(self._attn(e, h, q, v), 0.0)

    def mlp_ms(self, e: Any, m: Any) -> np.ndarray:
        return np.maximum(self._mlp(e, m), 0.0)

    def _halves(self, e: Any, h: Any, q: Any, v: Any, m: Any) -> np.ndarray:
        return self.attn_ms(e, h, q, v) + self.mlp_ms(e, m)

    @property
    def removal_unavailable(self) -> str | None:
        """Why this table cannot price a removed sub-layer (``None``: it can)."""
        lacking = [k.value for k in ONE_HALF_BLOCKS if k not in self.one_half]
        if not lacking:
            return None
        return (f"the latency table has no measured one-half blocks ({' or '.join(lacking)} rows), so it cannot "
                "price removing a whole attention or MLP; profile a new table (its space measures them) to "
                "remove sub-layers, or prune widths only (--remove none)")

    def blocks_ms(self, e: Any, h: Any, q: Any, v: Any, m: Any) -> np.ndarray:
        """Calibrated latency of blocks given as broadcastable width arrays (``h = 0``: no attention, ``m = 0``:
        no MLP; a one-half block the table cannot price is NaN): ``scale · raw + per_block · r_block``, at
        least half the scaled raw price by construction (:mod:`nvit.lut.calibration`)."""
        raw = self._raw_blocks_ms(e, h, q, v, m)
        return self.scale * raw + self.per_block_ms * self.floors.block_share(raw)

    def _raw_blocks_ms(self, e: Any, h: Any, q: Any, v: Any, m: Any) -> np.ndarray:
        return self.measured_blocks.override(e, h, q, v, m, self.modelled_blocks_ms(e, h, q, v, m))

    def modelled_blocks_ms(self, e: Any, h: Any, q: Any, v: Any, m: Any) -> np.ndarray:
        """Raw block prices from the block model alone (halves and interactions), ignoring measured block rows."""
        e, h, q, v, m = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (e, h, q, v, m)))
        has_attn, has_mlp = h > 0, m > 0
        attn = np.where(has_attn, self.attn_ms(e, h, q, v), 0.0)
        mlp = np.where(has_mlp, self.mlp_ms(e, m), 0.0)
        out = np.where(has_attn & has_mlp, self.interaction(e, attn + mlp), 0.0)
        for kind, present, half in ((PartKind.ATTN_BLOCK, has_attn & ~has_mlp, attn),
                                    (PartKind.MLP_BLOCK, has_mlp & ~has_attn, mlp)):
            if present.any():
                fit = self.one_half.get(kind)
                out = np.where(present, fit(e, half) if fit is not None else np.nan, out)
        return out

    @property
    def smallest_fixed_ms(self) -> float:
        """The smallest measured fixed part (raw, floored at 0)."""
        return float(np.min(np.maximum(self._fixed.values, 0.0)))

    def fixed_ms(self, e: Any) -> np.ndarray:
        """The scaled fixed part; below the smallest measured one it also takes its share of a negative
        offset back (``offset · (r_fixed − 1)``), so fixed part plus offset stay positive."""
        raw = np.maximum(self._fixed(e), 0.0)
        return self.scale * raw + self._offset_ms * (self.floors.fixed_share(raw) - 1.0)

    # ---- Predictor interface -------------------------------------------------------------------
    def block_latency_ms(self, embed_dim: int, block: BlockSpec) -> float:
        return float(self.blocks_ms(embed_dim, block.heads, block.qk_dim, block.v_dim, block.mlp_dim))

    def fixed_latency_ms(self, embed_dim: int) -> float:
        return float(self.fixed_ms(embed_dim))

    def offset_ms(self) -> float:
        return self._offset_ms

    def grid_report(self, spec: ArchSpec) -> GridReport:
        """Where ``spec`` lies relative to the table's measured grid, per axis (never raises)."""
        return self.grid.locate(spec)

    def check_spec(self, spec: ArchSpec) -> GridReport:
        """A spec the table cannot speak for (other token count, image or head, or widths far outside the
        measured grid: :mod:`nvit.lut.coverage`) is a :class:`LutError`; one outside the grid but near it is
        predicted by extrapolation with a warning (once per axis and direction)."""
        check_compatible(self.meta, num_tokens=spec.num_tokens, source="the latency table")
        base = self.meta.base_arch
        for key in FIXED_PART_FIELDS:
            if key in base and base[key] != getattr(spec, key):
                raise LutError(f"the latency table's fixed parts were measured with {key}={base[key]!r}, "
                               f"the architecture has {getattr(spec, key)!r}")
        if any(n for n in spec.removed_sublayers.values()) and self.removal_unavailable:
            raise LutError(self.removal_unavailable)
        report = self.grid.check(spec, what=f"architecture {spec.name!r}" if spec.name else "the architecture")
        for extent in report.outside():
            key = (extent.axis, extent.steps_below > 0, extent.steps_above > 0)
            if self.warn_outside and extent.status is GridStatus.OUTSIDE and key not in self._warned:
                self._warned.add(key)
                logger.warning("extrapolating outside the latency table's measured grid: %s", extent.describe())
        return report

    @staticmethod
    def _widths(spec: ArchSpec) -> tuple[np.ndarray, ...]:
        return tuple(np.array([getattr(b, f) for b in spec.blocks], dtype=np.float64)
                     for f in ("heads", "qk_dim", "v_dim", "mlp_dim"))

    def block_latencies_ms(self, spec: ArchSpec) -> list[float]:
        self.check_spec(spec)
        return [float(x) for x in self.blocks_ms(spec.embed_dim, *self._widths(spec))]

    def predict_ms(self, spec: ArchSpec) -> float:
        self.check_spec(spec)
        blocks = self.blocks_ms(spec.embed_dim, *self._widths(spec))
        return float(sum(blocks.tolist())) + self.fixed_latency_ms(spec.embed_dim) + self.offset_ms()

    def delta_ms(self, spec: ArchSpec, step: WidthSteps = UNIT_STEPS) -> LatencyDeltas:
        """Same numbers as :meth:`Predictor.delta_ms` (finite differences), computed in a few array calls."""
        self.check_spec(spec)
        e, depth = spec.embed_dim, spec.depth
        names = ("heads", "qk", "v", "mlp")
        widths = np.stack(self._widths(spec))  # (4, depth)
        # One batch of queries: the blocks as they are, each type shrunk by one unit, and e shrunk.
        batch = np.tile(widths, (1, len(names) + 2))
        for i, name in enumerate(names):
            batch[i, (i + 1) * depth:(i + 2) * depth] -= step.step(_STEP_FIELDS[name])
        embed = np.full(batch.shape[1], float(e))
        embed[-depth:] = e - step.embed_dim
        lat = self.blocks_ms(embed, *batch).reshape(len(names) + 2, depth)
        base = lat[0]
        out = {name: np.where(batch[i, (i + 1) * depth:(i + 2) * depth] > 0, base - lat[i + 1], np.nan)
               for i, name in enumerate(names)}
        if e - step.embed_dim > 0:
            total = float(sum(base.tolist())) + self.fixed_latency_ms(e) + self.offset_ms()
            total_smaller = float(sum(lat[-1].tolist())) + self.fixed_latency_ms(e - step.embed_dim) + self.offset_ms()
            emb = total - total_smaller
        else:
            emb = float("nan")
        return LatencyDeltas(emb_ms=emb, heads_ms=out["heads"], qk_ms=out["qk"], v_ms=out["v"], mlp_ms=out["mlp"])
