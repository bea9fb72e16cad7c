"""One pruning step of the loop: the saliency window becomes unit scores, groups are formed anew from them,
ranked, and removed one at a time, with the predicted latency recomputed after each, until the step's goal.

The ranking is ``I − η·ΔLat`` (η fixed at the first step), saliency alone, ``I − η·ΔFLOPs``, or the
latency-budgeted knapsack (:class:`~nvit.pruning.config.RankingMethod`). :class:`GroupRemover` owns what the
ranking remembers between steps (the mask, the saliency window, the scores' moving average, η) and hands it to
the run's checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from nvit.lut.base import Predictor, flops_predictor
from nvit.pruning.config import PruneConfig, RankingMethod
from nvit.pruning.groups import GroupLayout, PruneError
from nvit.pruning.knapsack import knapsack_order
from nvit.pruning.regularizer import LatencyTradeoff, checked_deltas, gate_latency_deltas_ms, rank
from nvit.pruning.saliency import SaliencyAccumulator, ScoreAverage, normalise
from nvit.pruning.state import PruneState

log = logging.getLogger(__name__)


class GroupRemover:
    """The mask of a model being pruned and how the next groups to remove are chosen."""

    def __init__(self, layout: GroupLayout, config: PruneConfig, predictor: Predictor, dense_ms: float) -> None:
        self.layout, self.config, self.predictor = layout, config, predictor
        self.state = PruneState(layout)
        self.saliency = SaliencyAccumulator(layout)
        self.scores = ScoreAverage(layout, config.saliency_ema)
        self.tradeoff = LatencyTradeoff(config.latency_weight) if config.uses_latency_term else None
        # the FLOPs ranking prices groups by FLOPs in the units of the table's dense prediction
        self.rank_predictor = (flops_predictor(layout.spec, dense_ms)
                               if config.ranking is RankingMethod.FLOPS else predictor)
        self.groups_removed = 0
        self.latency_ms = dense_ms

    def remove_until(self, goal_ms: float) -> tuple[int, float]:
        """Rank the groups the window's scores form and remove them in order until the predicted latency is
        at most ``goal_ms``; (groups removed, η)."""
        cfg, state, lay = self.config, self.state, self.layout
        window = self.saliency.mean()
        self.saliency.reset()
        scores = self.scores.update(normalise(window, lay, cfg.saliency_norm))
        cand = state.candidates(scores)
        if len(cand) == 0:
            raise PruneError("no group can be removed any more, yet a target is not met")
        if cfg.ranking is RankingMethod.KNAPSACK:
            deltas = checked_deltas(lay, cand, gate_latency_deltas_ms(lay, self.predictor, state.widths))
            order, eta = knapsack_order(cand, deltas, self.latency_ms - goal_ms), math.nan
        else:
            gate_d = (gate_latency_deltas_ms(lay, self.rank_predictor, state.widths) if cfg.uses_latency_term
                      else None)
            ranking = rank(lay, cand, delta_ms=gate_d, tradeoff=self.tradeoff)
            order, eta = ranking.order(), ranking.eta
        removed = 0
        for pos in order:
            units = cand.units[int(pos)]
            if not state.can_remove(units):
                continue
            state.remove(units)
            removed += 1
            self.latency_ms = self.predictor.predict_ms(state.spec())
            if self.latency_ms <= goal_ms:
                break
        self.groups_removed += removed
        return removed, eta

    # ---- persistence (the run's checkpoint keys) -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"alive": torch.from_numpy(self.state.alive.copy()), "saliency": self.saliency.state_dict(),
                "scores": self.scores.state_dict(), "eta": None if self.tradeoff is None else self.tradeoff.eta,
                "groups_removed": self.groups_removed}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.state = PruneState(self.layout, st["alive"].numpy())
        self.saliency.load_state_dict(st["saliency"])
        self.scores.load_state_dict(st["scores"])
        if self.tradeoff is not None:
            self.tradeoff.eta = st["eta"]
        self.groups_removed = int(st["groups_removed"])
        self.latency_ms = self.predictor.predict_ms(self.state.spec())
