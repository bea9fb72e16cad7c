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


RECIPES: dict[str, GridRecipe] = {
    # 4 x 4 x 2 x 2 = 64 attention configs, 24 MLP, 8 blocks, 4 fixed: a couple of minutes on 2 CPU cores.
    # Every width reaches down to the pruning group size (8), so pruned models never leave the grid.
    "vit_test": GridRecipe(4, 16, 16, 4, 8, 6, 0.03125, 8, 2),
    # 5 x 3 x 4 x 4 = 240 attention configs, 30 MLP, 20 blocks, 5 fixed.
    "deit_tiny": GridRecipe(5, 64, 32, 3, 8, 6, 0.125, 64, 4),
    # 6 x 6 x 4 x 4 = 576 attention configs, 42 MLP, 24 blocks, 6 fixed: about 17 min at 1.6 s per config.
    "deit_small": GridRecipe(6, 64, 64, 6, 8, 7, 0.0625, 64, 4),
    # 6 x 5 x 4 x 4 = 480 attention configs, 42 MLP, 18 blocks, 6 fixed.
    "deit_base": GridRecipe(7, 128, 128, 5, 8, 7, 0.0625, 128, 3),
}


def aligned_span(lo: int, hi: int, points: int, align: int) -> tuple[int, ...]:
    """``points`` values evenly spaced from ``lo`` to ``hi``, rounded to multiples of ``align`` (``hi`` kept)."""
    if points <= 1 or lo >= hi:
        return (hi,)
    values = {hi, max(align, round(lo / align) * align)}
    for x in np.linspace(lo, hi, points)[1:-1]:
        values.add(max(align, round(x / align) * align))
    return tuple(sorted(v for v in values if v <= hi))


def doubling_span(unit: int, hi: int) -> tuple[int, ...]:
    """``unit, 2·unit, 4·unit, ...`` below ``hi``, then ``hi``."""
    values = [unit * 2**k for k in range(int(math.log2(max(hi // unit, 1))) + 1) if unit * 2**k < hi]
    return (*values, hi)

