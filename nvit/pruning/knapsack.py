"""A latency-budgeted knapsack over groups (after HALP, Shen et al., NeurIPS 2022), one pruning step at a time.

At each pruning step the loop must save ``quota_ms`` of predicted latency (the pace). Instead of ranking
by ``I − η·ΔLat``, choose how many groups to remove from every gate so that the saliency removed is the
smallest possible while the latency saved reaches the quota::

    minimise Σ_j S_j(k_j)   subject to   Σ_j k_j · ΔLat_j ≥ quota

where ``S_j(k)`` is the summed saliency of gate j's ``k`` lowest groups (removing any other ``k`` groups of
one gate costs more saliency for the same latency) and ``ΔLat_j`` the latency one of its groups saves at
the current widths. That is a multiple-choice knapsack; it is solved exactly on a grid of
``bins`` equal parts of the quota by dynamic programming (gains rounded down, so the chosen set always
reaches the quota when any set does). No η is involved: latency enters as the constraint, not as a price.
"""

from __future__ import annotations

import numpy as np

from nvit.pruning.state import Candidates

DEFAULT_BINS = 256


def knapsack_order(candidates: Candidates, delta_ms: np.ndarray, quota_ms: float, *,
                   bins: int = DEFAULT_BINS) -> np.ndarray:
    """Positions of all candidates in removal order: the knapsack's set first (most saliency per ms saved
    first), then the rest by saliency per ms, in case the predictor's real savings fall short of the
    linear estimate; the loop stops removing once the quota is met.

    ``delta_ms`` is ΔLat per candidate. When no set reaches the quota, the set saving the most latency comes
    first.
    """
    if len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    if quota_ms <= 0:
        return _by_ratio(candidates, delta_ms, np.arange(len(candidates)))
    unit = quota_ms / bins
    options: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per gate: positions, gains (bins), costs
    for j in np.unique(candidates.gate):
        pos = np.flatnonzero(candidates.gate == j)
        pos = pos[np.argsort(candidates.rank[pos], kind="stable")]
        step = float(delta_ms[pos[0]])
        if not np.isfinite(step) or step <= 0:
            continue  # a group that saves no time never helps to meet the quota
        k = np.arange(1, len(pos) + 1)
        gains = np.minimum(bins, np.floor(k * step / unit).astype(np.int64))
        costs = np.cumsum(np.maximum(candidates.saliency[pos], 0.0))
        options.append((pos, gains, costs))
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    choices = []
    levels = np.arange(bins + 1)
    for _, gains, costs in options:
        new, choice = best.copy(), np.zeros(bins + 1, dtype=np.int64)
        for k, (gain, cost) in enumerate(zip(gains, costs, strict=True), start=1):
            candidate = np.full(bins + 1, np.inf)
            candidate[:] = best[np.maximum(0, levels - gain)] + cost
            better = candidate < new
            new[better], choice[better] = candidate[better], k
        best = new
        choices.append(choice)
    level = bins if np.isfinite(best[bins]) else int(np.max(np.flatnonzero(np.isfinite(best))))
    chosen: list[int] = []
    for (pos, gains, _), choice in zip(reversed(options), reversed(choices), strict=True):
        k = int(choice[level])
        if k:
            chosen.extend(int(p) for p in pos[:k])
            level = max(0, level - int(gains[k - 1]))
    return np.concatenate([_by_ratio(candidates, delta_ms, np.array(sorted(chosen), dtype=np.int64)),
                           _by_ratio(candidates, delta_ms, np.setdiff1d(np.arange(len(candidates)), chosen))])


def _by_ratio(candidates: Candidates, delta_ms: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``positions`` by saliency per ms saved (groups that save nothing last), then rank within the gate."""
    saves = delta_ms[positions] > 0
    ratio = np.where(saves, candidates.saliency[positions] / np.where(saves, delta_ms[positions], 1.0), np.inf)
    return positions[np.lexsort((candidates.rank[positions], ratio))]
