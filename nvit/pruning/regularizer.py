"""The latency regularizer: ``score(S) = I(S) − η · ΔLat(S)``; the lowest scores are pruned first.

``ΔLat(S)`` is the latency (ms) saved by removing one group of S's gate from the architecture at its
*current* widths, from :meth:`nvit.lut.base.Predictor.delta_ms` (for EMB: the whole model, every block and
the fixed parts; for a whole sub-layer: the measured drop to the block without it). All groups of one gate
share it.

**η is unit-free and fixed for the whole run.** Saliency has loss units and ΔLat has milliseconds of one
device, so a raw η means nothing across models, data sets and devices. nvit takes a unit-free
``latency_weight`` λ and sets, *once*, at the first pruning step, over the groups that may be removed then::

    η = λ · median(I) / median(|ΔLat|)

so that, with λ = 1, a group of median latency cost at the start is worth a median saliency at the start.
Rescaling the loss or the LUT's time unit leaves the ranking unchanged. η then stays fixed, as NViT's
does: a scale re-taken at every step would jump whenever the mix of candidate types changes (when the MLP
groups, the most numerous, shrink, both medians move to another type's), so the trade-off would change
several-fold in the middle of a run. The value is kept in the run's checkpoint and logged at every step.
Ranking by saliency alone (``ranking="saliency"``, ``--no-latency``) is an explicit choice, not λ = 0 by
accident: a missing LUT never disables the regularizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.lut.base import Predictor
from nvit.pruning.groups import (
    BLOCK_KINDS,
    KIND_CODES,
    SUBLAYER_KINDS,
    GroupKind,
    GroupLayout,
    PruneError,
)
from nvit.pruning.state import Candidates

log = logging.getLogger(__name__)


def gate_latency_deltas_ms(layout: GroupLayout, predictor: Predictor, widths: np.ndarray) -> np.ndarray:
    """ΔLat (ms) of removing one group of each gate at the gate widths ``widths`` (a
    :attr:`~nvit.pruning.state.PruneState.widths`), one entry per gate: for a width gate one group's
    saving, for a layer gate the whole sub-layer's (:meth:`~nvit.lut.base.Predictor.sublayer_deltas_ms`:
    the measured one-half block, or the whole block when it is the last sub-layer); NaN for the gates of a
    removed sub-layer or dropped block. A Swin's are finite differences of whole-model predictions, one per
    gate (:func:`finite_difference_deltas_ms`)."""
    if layout.is_swin:
        return finite_difference_deltas_ms(layout, predictor, widths)
    blocks = layout.block_specs(widths)
    alive = [i for i, b in enumerate(blocks) if b is not None]
    spec = layout.spec_at(widths)
    d = predictor.delta_ms(spec, layout.unit_step())
    per_block = np.full((layout.spec.depth, len(BLOCK_KINDS) + len(SUBLAYER_KINDS)), np.nan)
    width_d = np.stack([np.asarray(d.heads_ms), np.asarray(d.qk_ms), np.asarray(d.v_ms), np.asarray(d.mlp_ms)], 1)
    if width_d.shape != (len(alive), len(BLOCK_KINDS)):
        raise PruneError(f"the latency predictor returned deltas for {width_d.shape[0]} blocks, expected {len(alive)}")
    per_block[alive, :len(BLOCK_KINDS)] = width_d
    if any(k in layout.removable for k in SUBLAYER_KINDS):
        sub = predictor.sublayer_deltas_ms(spec.embed_dim, tuple(blocks[i] for i in alive))
        per_block[alive, len(BLOCK_KINDS)] = sub.attn_ms
        per_block[alive, len(BLOCK_KINDS) + 1] = sub.mlp_ms
    out = np.empty(len(layout.gates), dtype=np.float64)
    is_emb = layout.gate_kind == KIND_CODES[GroupKind.EMB]
    out[is_emb] = float(d.emb_ms)
    blk = ~is_emb
    out[blk] = per_block[layout.gate_block[blk], layout.gate_kind[blk] - 1]
    return out


def finite_difference_deltas_ms(layout: GroupLayout, predictor: Any, widths: np.ndarray) -> np.ndarray:
    """ΔLat of removing one group of each gate: the whole model's prediction at ``widths`` minus its prediction
    with that gate one group narrower (any architecture the predictor prices whole); for a removable layer gate
    whose block keeps its other sub-layer, the saving of removing the sub-layer. NaN for a gate that cannot
    lose a group, for the layer gates that stay and for those of a block's last sub-layer."""
    base = predictor.predict_ms(layout.spec_at(widths))
    out = np.full(len(layout.gates), np.nan)
    for j, gate in enumerate(layout.gates):
        narrower = np.array(widths, dtype=np.int64)
        narrower[j] -= layout.gate_group[j]
        if gate.kind in SUBLAYER_KINDS:
            sibling = layout.gate_sibling[j]
            if gate.kind not in layout.removable or widths[j] == 0 or sibling < 0 or widths[sibling] == 0:
                continue
        elif narrower[j] <= 0:
            continue
        out[j] = base - predictor.predict_ms(layout.spec_at(narrower))
    return out


def checked_deltas(layout: GroupLayout, candidates: Candidates, gate_delta_ms: np.ndarray) -> np.ndarray:
    """ΔLat of each candidate group; a non-finite value for a group that may be removed is an error."""
    lat = np.asarray(gate_delta_ms, dtype=np.float64)[candidates.gate]
    bad = np.flatnonzero(~np.isfinite(lat))
    if bad.size:
        raise PruneError(f"the latency predictor gives no finite ΔLat for {layout.gates[candidates.gate[bad[0]]].name}")
    return lat


def unit_free_eta(saliency: np.ndarray, delta_ms: np.ndarray, latency_weight: float) -> float:
    """``λ · median(I) / median(|ΔLat|)`` over the given groups (see the module docstring)."""
    if latency_weight == 0 or saliency.size == 0:
        return 0.0
    scale_i = float(np.median(saliency)) or float(np.mean(saliency))
    scale_lat = float(np.median(np.abs(delta_ms))) or float(np.mean(np.abs(delta_ms)))
    if scale_lat == 0.0:
        log.warning("the latency predictor saves no time for any candidate group; ranking by saliency only")
        return 0.0
    return latency_weight * scale_i / scale_lat


class LatencyTradeoff:
    """η for a whole run: computed at the first pruning step (:func:`unit_free_eta`), then fixed."""

    def __init__(self, latency_weight: float, eta: float | None = None) -> None:
        self.latency_weight, self.eta = latency_weight, eta

    def fix(self, saliency: np.ndarray, delta_ms: np.ndarray) -> float:
        if self.eta is None:
            self.eta = unit_free_eta(saliency, delta_ms, self.latency_weight)
            log.info("latency trade-off fixed at eta = %.4g (lambda %.3g)", self.eta, self.latency_weight)
        return self.eta


@dataclass(frozen=True)
class Ranking:
    """Scores of the candidate groups at one pruning step (ascending score = pruned first)."""

    candidates: Candidates
    delta_ms: np.ndarray  # ΔLat per candidate (zeros when the regularizer is off)
    eta: float  # saliency units per ms; 0 without the regularizer
    scores: np.ndarray

    def order(self) -> np.ndarray:
        """Candidate positions, lowest score first (ties broken by gate, then rank in the gate)."""
        c = self.candidates
        return np.lexsort((c.rank, c.gate, self.scores))


def rank(layout: GroupLayout, candidates: Candidates, *, delta_ms: np.ndarray | None,
         tradeoff: LatencyTradeoff | None) -> Ranking:
    """Score the candidates: ``I − η·ΔLat`` (``delta_ms`` per gate; ``None`` ranks by saliency alone)."""
    sal = candidates.saliency
    if delta_ms is None or tradeoff is None:
        return Ranking(candidates, np.zeros_like(sal), 0.0, sal.copy())
    lat = checked_deltas(layout, candidates, delta_ms)
    eta = tradeoff.fix(sal, lat)
    return Ranking(candidates, lat, eta, sal - eta * lat)
