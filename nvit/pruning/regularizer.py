"""The latency regularizer: ``score(S) = I(S) − η_eff · ΔLat(S)``; the lowest scores are pruned first.

``ΔLat(S)`` is the latency (ms) saved by removing group S from the architecture at its *current* widths,
from :meth:`nvit.lut.base.Predictor.delta_ms` (for EMB: the whole model, every block and the fixed parts).

**Scaling of η.** Saliency has loss units and ΔLat has milliseconds of one device, so a raw η means
nothing across models, data sets and GPUs. nvit takes a unit-free ``latency_weight`` λ and sets, at every
pruning step, over the groups that may be removed at that step::

    η_eff = λ · median(I) / median(|ΔLat|)

so that, with λ = 1, a group of median latency cost is worth a median saliency: ``score / median(I) =
I / median(I) − λ · ΔLat / median(|ΔLat|)``. Rescaling the loss or the LUT's time unit leaves the ranking
unchanged; λ = 0 ranks by saliency alone. Pruning without the regularizer is a separate, explicit choice
(``use_latency=False`` / ``--no-latency``), not λ = 0 by accident: a missing LUT never disables it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nvit.arch import ArchSpec
from nvit.lut.base import Predictor
from nvit.pruning.groups import BLOCK_KINDS, KIND_CODES, GroupKind, GroupLayout, PruneError

log = logging.getLogger(__name__)


def group_latency_deltas_ms(layout: GroupLayout, predictor: Predictor, spec: ArchSpec) -> np.ndarray:
    """ΔLat (ms) of removing each group from ``spec`` (the current widths), one entry per group."""
    d = predictor.delta_ms(spec, layout.unit_step())
    per_block = np.stack([np.asarray(d.heads_ms), np.asarray(d.qk_ms), np.asarray(d.v_ms), np.asarray(d.mlp_ms)], 1)
    if per_block.shape != (layout.spec.depth, len(BLOCK_KINDS)):
        raise PruneError(f"the latency predictor returned deltas for {per_block.shape[0]} blocks, expected "
                         f"{layout.spec.depth}")
    out = np.empty(len(layout), dtype=np.float64)
    is_emb = layout.kind_code == KIND_CODES[GroupKind.EMB]
    out[is_emb] = float(d.emb_ms)
    blk = ~is_emb
    out[blk] = per_block[layout.block[blk], layout.kind_code[blk] - 1]
    return out


@dataclass(frozen=True)
class Ranking:
    """Scores of the candidate groups at one pruning step (ascending score = pruned first)."""

    candidates: np.ndarray  # group indices
    saliency: np.ndarray  # normalised I, per candidate
    delta_ms: np.ndarray  # ΔLat per candidate (zeros when the regularizer is off)
    eta_eff: float  # saliency units per ms; 0 without the regularizer
    scores: np.ndarray

    def order(self) -> np.ndarray:
        """Candidate group indices, lowest score first (ties broken by group index, deterministically)."""
        return self.candidates[np.lexsort((self.candidates, self.scores))]


def effective_eta(saliency: np.ndarray, delta_ms: np.ndarray, latency_weight: float) -> float:
    """``λ · median(I) / median(|ΔLat|)`` over the candidates (see the module docstring)."""
    if latency_weight == 0 or saliency.size == 0:
        return 0.0
    scale_i = float(np.median(saliency)) or float(np.mean(saliency))
    scale_lat = float(np.median(np.abs(delta_ms))) or float(np.mean(np.abs(delta_ms)))
    if scale_lat == 0.0:
        log.warning("the latency predictor saves no time for any candidate group; ranking by saliency only")
        return 0.0
    return latency_weight * scale_i / scale_lat


def rank(
    layout: GroupLayout,
    candidates: np.ndarray,
    saliency: np.ndarray,
    *,
    delta_ms: np.ndarray | None,
    latency_weight: float,
) -> Ranking:
    """Score the candidates: ``I − η_eff·ΔLat`` (``delta_ms`` per group of the layout, ``None`` = off)."""
    cand = np.asarray(candidates, dtype=np.int64)
    sal = np.asarray(saliency, dtype=np.float64)[cand]
    if delta_ms is None:
        return Ranking(cand, sal, np.zeros_like(sal), 0.0, sal.copy())
    lat = np.asarray(delta_ms, dtype=np.float64)[cand]
    bad = np.flatnonzero(~np.isfinite(lat))
    if bad.size:
        raise PruneError(f"the latency predictor gives no finite ΔLat for {layout.groups[int(cand[bad[0]])].name}")
    eta = effective_eta(sal, lat, latency_weight)
    return Ranking(cand, sal, lat, eta, sal - eta * lat)
