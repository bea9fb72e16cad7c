"""Pruning never leaves the latency table's measured grid.

A width the table never measured is a width the regularizer cannot price: below the grid the predictor
extrapolates (and floors at 0 ms), so pruning would count savings that do not exist. So the minimum width
of every structure type is at least the smallest width the table measured for it
(:class:`~nvit.lut.coverage.MeasuredGrid`, read from the predictor), and a base model wider (or narrower) than
the table is refused before any work. Between grid points the predictor interpolates, which is what the
table is for. Predictors without a table (the FLOPs stand-in) bound nothing. Likewise a whole sub-layer
may only be removed where the table measured what a block costs without it (:func:`removable_sublayers`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from nvit.arch import ArchSpec
from nvit.errors import LutError
from nvit.lut.base import Predictor
from nvit.pruning.config import DEFAULT_REMOVE, PruneConfig, Sublayer
from nvit.pruning.groups import BLOCK_KINDS, GROUP_WIDTH_FIELD, GroupKind, GroupLayout, Minimums

log = logging.getLogger(__name__)


def measured_grid(predictor: Predictor) -> Any:
    """The :class:`~nvit.lut.coverage.MeasuredGrid` of a LUT-backed predictor, ``None`` for one without a table."""
    return getattr(predictor, "grid", None)


def check_within(spec: ArchSpec, grid: Any) -> None:
    """Refuse a model that lies outside the measured grid anywhere (one line naming the first width)."""
    if grid is None:
        return
    where = [(GroupKind.EMB, "", spec.embed_dim)]
    for i, b in enumerate(spec.blocks):
        where += [(kind, f"block {i} ", getattr(b, GROUP_WIDTH_FIELD[kind])) for kind in BLOCK_KINDS
                  if (b.has_mlp if kind is GroupKind.MLP else b.has_attn)]  # a removed sub-layer has no width
    for kind, prefix, width in where:
        axis = GROUP_WIDTH_FIELD[kind]
        lo, hi = grid.smallest(axis), grid.largest(axis)
        if width > hi:
            raise LutError(f"the model is wider than the latency table: {prefix}{axis} {width} > {hi}, the largest "
                           f"measured; profile a table whose space reaches the model's widths")
        if width < lo:
            raise LutError(f"the model is narrower than the latency table: {prefix}{axis} {width} < {lo}, the "
                           f"smallest measured; profile a table whose space reaches down to the model's widths")


def grid_minimums(minimums: Minimums, grid: Any) -> Minimums:
    """``minimums`` raised to the smallest measured width of each type (unchanged without a table)."""
    if grid is None:
        return minimums
    changes = {}
    for kind in (GroupKind.EMB, *BLOCK_KINDS):
        field = GROUP_WIDTH_FIELD[kind]
        changes[field] = max(getattr(minimums, field) or 0, grid.smallest(field))
    return replace(minimums, **changes)


def sublayers_that_may_go(remove: tuple[Sublayer, ...] | None, predictor: Predictor) -> tuple[Sublayer, ...]:
    """What pruning removes besides widths: ``remove``, or :data:`DEFAULT_REMOVE` when not given, and nothing
    where the table cannot price a removed sub-layer (no check, no warning: :func:`removable_sublayers`)."""
    wanted = DEFAULT_REMOVE if remove is None else remove
    return () if getattr(predictor, "removal_unavailable", None) else wanted


def removable_sublayers(config: PruneConfig, predictor: Predictor) -> frozenset[GroupKind]:
    """The layer-gate kinds pruning may remove (:func:`sublayers_that_may_go`). A table that cannot price a
    removed sub-layer refuses an explicit request in one line, and turns the default into width-only pruning
    with a warning that says why."""
    wanted = DEFAULT_REMOVE if config.remove is None else config.remove
    if wanted and not sublayers_that_may_go(config.remove, predictor):
        if config.remove is not None:
            raise LutError(predictor.removal_unavailable)
        log.warning("pruning widths only: %s", predictor.removal_unavailable)
        return frozenset()
    return frozenset({Sublayer.ATTN: GroupKind.ATTN_LAYER, Sublayer.MLP: GroupKind.MLP_LAYER}[w] for w in wanted)


def pruning_layout(spec: ArchSpec, config: PruneConfig, predictor: Predictor) -> GroupLayout:
    """The groups of ``spec`` with minimums raised to the table's smallest measured widths; a model outside
    the table's grid is refused (:mod:`nvit.pruning.limits`)."""
    grid = measured_grid(predictor)
    check_within(spec, grid)
    return GroupLayout(spec, group_size=config.group_size, minimums=grid_minimums(config.minimums(), grid),
                       removable=removable_sublayers(config, predictor))
