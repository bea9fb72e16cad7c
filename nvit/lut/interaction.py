"""How a whole block differs from the sum of its two halves, fitted on the full blocks a table measured.

A block is not exactly ``attn + mlp``: it is one call instead of two (one call overhead and one copy of the
``N × e`` activations fewer), and its two halves' weights compete for the same caches. The first is a
fixed cost that grows with the embedding width, the second grows with the block's size, so::

    block(e, h, q, v, m) = slope · (attn + mlp) + overhead_ms + overhead_ms_per_embed · e

One slope and one overhead line for the whole table, fitted by least squares on relative residuals over
every measured full block (at least four, across sizes: the space samples the largest and the smallest
block of each embedding width and random ones between). A single ratio per embedding width, as earlier
tables were read, cannot follow a narrow block, whose fixed cost is a larger share: on DeiT-Tiny on a CPU
it over-predicts the narrow half of the blocks by 3% and under-predicts the wide half by 2% (BENCHMARKS.md §1).

Too few blocks, blocks of one size only, or an implausible fit fall back to the mean ratio
``block / (attn + mlp)`` (``slope`` = that ratio, no overhead); a table without full blocks uses 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Fewest full blocks for the fit (three parameters), and the spread of their sizes it needs.
MIN_BLOCKS = 4
MIN_SIZE_SPREAD = 1.5
#: A slope outside this range means the blocks are too noisy to fit: fall back to the mean ratio.
SLOPE_BOUNDS = (0.7, 1.5)
#: A block is never predicted below this fraction of its halves (guards the fixed cost at tiny widths).
MIN_FRACTION_OF_HALVES = 0.5


@dataclass(frozen=True)
class BlockInteraction:
    """``block = slope · halves + overhead_ms + overhead_ms_per_embed · e`` (see the module doc)."""

    slope: float = 1.0
    overhead_ms: float = 0.0
    overhead_ms_per_embed: float = 0.0
    method: str = "none"  # "affine" | "ratio" | "none"
    blocks: int = 0
    residual_pct_mean_abs: float = 0.0  # on the fitted blocks

    def __call__(self, e: Any, halves_ms: Any) -> np.ndarray:
        halves = np.asarray(halves_ms, dtype=np.float64)
        block = self.slope * halves + self.overhead_ms + self.overhead_ms_per_embed * np.asarray(e, dtype=np.float64)
        return np.maximum(block, MIN_FRACTION_OF_HALVES * halves)

    @classmethod
    def fit(cls, embed_dim: np.ndarray, halves_ms: np.ndarray, block_ms: np.ndarray) -> BlockInteraction:
        """Fit on measured full blocks: their embedding widths, predicted halves and measured latencies."""
        e = np.asarray(embed_dim, dtype=np.float64)
        x = np.asarray(halves_ms, dtype=np.float64)
        y = np.asarray(block_ms, dtype=np.float64)
        ok = (x > 0) & (y > 0)
        e, x, y = e[ok], x[ok], y[ok]
        if len(y) == 0:
            return cls()
        ratio = cls(slope=float(np.mean(y / x)), method="ratio", blocks=len(y))
        if len(y) < MIN_BLOCKS or x.max() / x.min() < MIN_SIZE_SPREAD:
            return ratio._with_residual(e, x, y)
        columns = [x, np.ones_like(x)] + ([e] if np.ptp(e) > 0 else [])
        design = np.vstack(columns).T / y[:, None]  # relative residuals: narrow blocks count as much
        coef = np.linalg.lstsq(design, np.ones_like(y), rcond=None)[0]
        fitted = cls(slope=float(coef[0]), overhead_ms=float(coef[1]),
                     overhead_ms_per_embed=float(coef[2]) if len(coef) > 2 else 0.0, method="affine",
                     blocks=len(y))
        if not SLOPE_BOUNDS[0] <= fitted.slope <= SLOPE_BOUNDS[1]:
            return ratio._with_residual(e, x, y)
        return fitted._with_residual(e, x, y)

    def _with_residual(self, e: np.ndarray, x: np.ndarray, y: np.ndarray) -> BlockInteraction:
        from dataclasses import replace

        residual = float(np.mean(np.abs(self(e, x) / y - 1.0)) * 100.0)
        return replace(self, residual_pct_mean_abs=residual)
