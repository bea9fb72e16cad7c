"""How a search space's grids are derived from an architecture: recipes and hardware-aligned spans."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GridRecipe:
    """How a preset space is derived from an architecture preset."""

    embed_points: int  # evenly spaced embedding widths from ``min_embed`` to the dense width
    min_embed: int
    embed_align: int
    max_head_points: int  # every head count when the model has at most this many, else evenly spaced
    head_dim_unit: int  # per-head widths double from this unit up to the dense head width
    mlp_points: int
    min_mlp_ratio: float  # smallest MLP width, as a fraction of the dense one
    mlp_align: int
    blocks_per_embed: int
    # MLP widths from the group size (``head_dim_unit``), dense at the narrow end (:func:`low_dense_span`);
    # ``min_mlp_ratio`` and ``mlp_align`` are then unused.
    mlp_low_dense: bool = False


RECIPES: dict[str, GridRecipe] = {
    # 4 x 4 x 2 x 2 = 64 attention configs, 24 MLP, 8 blocks, 4 fixed: a couple of minutes on 2 CPU cores.
    # Every width reaches down to the pruning group size (8), so pruned models never leave the grid.
    "vit_test": GridRecipe(4, 16, 16, 4, 8, 6, 0.03125, 8, 2),
    # The DeiT grids' MLP widths also reach the group size, where pruned blocks end (8, 24, 64, 192, ... for
    # deit_tiny): a narrow MLP is measured, not extrapolated.
    # 5 x 3 x 4 x 4 = 240 attention configs, 35 MLP, 20 blocks, 5 fixed.
    "deit_tiny": GridRecipe(5, 64, 32, 3, 8, 7, 0.125, 64, 4, mlp_low_dense=True),
    # 6 x 6 x 4 x 4 = 576 attention configs, 42 MLP, 24 blocks, 6 fixed.
    "deit_small": GridRecipe(6, 64, 64, 6, 8, 7, 0.0625, 64, 4, mlp_low_dense=True),
    # 6 x 5 x 4 x 4 = 480 attention configs, 42 MLP, 18 blocks, 6 fixed.
    "deit_base": GridRecipe(7, 128, 128, 5, 8, 7, 0.0625, 128, 3, mlp_low_dense=True),
}


def aligned_span(lo: int, hi: int, points: int, align: int) -> tuple[int, ...]:
    """``points`` values evenly spaced from ``lo`` to ``hi``, rounded to multiples of ``align`` (``hi`` kept)."""
    if points <= 1 or lo >= hi:
        return (hi,)
    values = {hi, max(align, round(lo / align) * align)}
    for x in np.linspace(lo, hi, points)[1:-1]:
        values.add(max(align, round(x / align) * align))
    return tuple(sorted(v for v in values if v <= hi))


def head_span(heads: int, max_points: int) -> tuple[int, ...]:
    """Head counts from 1 to ``heads``: all of them, or ``max_points`` spread evenly when there are more."""
    return tuple(range(1, heads + 1)) if heads <= max_points else aligned_span(1, heads, max_points, 1)


def doubling_span(unit: int, hi: int) -> tuple[int, ...]:
    """``unit, 2·unit, 4·unit, ...`` below ``hi``, then ``hi``."""
    values = [unit * 2**k for k in range(int(math.log2(max(hi // unit, 1))) + 1) if unit * 2**k < hi]
    return (*values, hi)



def low_dense_span(lo: int, hi: int, points: int, align: int) -> tuple[int, ...]:
    """About ``points`` values from ``lo`` to ``hi`` (multiples of ``align``): geometric from ``lo`` up to a
    quarter of ``hi``, then evenly spaced to ``hi``. Dense at the narrow end, where latency bends (fixed
    per-operator cost) and pruned layers end; even at the wide end, where it is nearly linear in the width."""
    if points <= 3 or lo * 4 >= hi:
        return aligned_span(lo, hi, points, align)
    linear = points // 2
    knee = hi / 4
    values = {max(align, round(x / align) * align) for x in np.geomspace(lo, knee, points - linear)}
    values |= {max(align, round(x / align) * align) for x in np.linspace(knee, hi, linear + 1)[1:]}
    return tuple(sorted(v for v in values if v <= hi))


#: The generic recipe (:func:`derive_axes`): how many values per axis at most.
MAX_EMBED_POINTS = 6
MAX_HEAD_POINTS = 6
MLP_POINTS = 7
GENERIC_BLOCKS_PER_EMBED = 4


def derive_axes(embed_dim: int, heads: int, qk_dim: int, v_dim: int, mlp_dim: int, *,
                group_size: int = 8) -> dict[str, tuple[int, ...]]:
    """Grid axes for any ViT's widths (the widest block's), every axis down to the pruning ``group_size``:
    embedding widths evenly from the group size (4–6 values, by width), heads all (or 6 spread) from 1,
    per-head Q/K and V widths doubling from the group size, MLP widths dense at the narrow end
    (:func:`low_dense_span`). All widths are multiples of ``group_size``, up to the model's own."""
    g = group_size
    embed_points = 4 if embed_dim <= 8 * g else 5 if embed_dim < 32 * g else MAX_EMBED_POINTS
    return {
        "embed_dims": aligned_span(min(g, embed_dim), embed_dim, embed_points, g),
        "heads": head_span(heads, MAX_HEAD_POINTS),
        "qk_dims": doubling_span(min(g, qk_dim), qk_dim),
        "v_dims": doubling_span(min(g, v_dim), v_dim),
        "mlp_dims": low_dense_span(min(g, mlp_dim), mlp_dim, MLP_POINTS, g),
    }
