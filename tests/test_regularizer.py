"""Latency regularizer: per-group ΔLat against whole-model predictions, unit-free η, ranking direction."""

from __future__ import annotations

import numpy as np
import pytest

from nvit.arch import preset
from nvit.lut.base import FlopsPredictor
from nvit.pruning.groups import GroupKind, GroupLayout, Minimums, PruneError, PruneState
from nvit.pruning.regularizer import effective_eta, group_latency_deltas_ms, rank

SPEC = preset("vit_test")


def layout() -> GroupLayout:
    return GroupLayout(SPEC, group_size=8, minimums=Minimums(embed_dim=16))


def pruned_state(lay: GroupLayout, n: int, seed: int) -> PruneState:
    state = PruneState(lay)
    for i in np.random.default_rng(seed).permutation(len(lay))[:n]:
        if state.removable(int(i)):
            state.remove(int(i))
    return state


def test_group_deltas_equal_whole_model_predictions_at_current_widths() -> None:
    lay = layout()
    predictor = FlopsPredictor(SPEC, reference_ms=4.0)
    state = pruned_state(lay, 60, seed=0)
    deltas = group_latency_deltas_ms(lay, predictor, state.spec())
    now = predictor.predict_ms(state.spec())
    for i in state.candidates():
        after = PruneState(lay, state.alive)
        after.remove(int(i))
        assert deltas[i] == pytest.approx(now - predictor.predict_ms(after.spec()), rel=1e-9, abs=1e-12)
    # an EMB group saves latency in every block, more than any one MLP chunk
    emb, mlp = lay.indices_of(GroupKind.EMB)[0], lay.indices_of(GroupKind.MLP)[0]
    assert deltas[emb] > deltas[mlp] > 0


def test_eta_is_unit_free_and_scales_as_documented() -> None:
    rng = np.random.default_rng(1)
    sal, lat = rng.lognormal(size=50), rng.lognormal(size=50) * 0.01
    eta = effective_eta(sal, lat, latency_weight=2.0)
    assert eta == pytest.approx(2.0 * np.median(sal) / np.median(lat))
    lay = GroupLayout(SPEC, group_size=1, minimums=Minimums(embed_dim=16))
    cand = np.arange(50)
    full_sal, full_lat = np.zeros(len(lay)), np.zeros(len(lay))
    full_sal[:50], full_lat[:50] = sal, lat
    base = rank(lay, cand, full_sal, delta_ms=full_lat, latency_weight=1.0).order()
    # loss in other units, latency in seconds instead of ms: the same ranking
    rescaled = rank(lay, cand, full_sal * 1e3, delta_ms=full_lat * 1e-3, latency_weight=1.0).order()
    np.testing.assert_array_equal(base, rescaled)
    assert effective_eta(sal, lat, latency_weight=0.0) == 0.0
    np.testing.assert_array_equal(rank(lay, cand, full_sal, delta_ms=full_lat, latency_weight=0.0).order(),
                                  cand[np.argsort(sal, kind="stable")])


def test_regularizer_prunes_latency_expensive_groups_first() -> None:
    lay = layout()
    predictor = FlopsPredictor(SPEC, reference_ms=4.0)
    state = PruneState(lay)
    cand = state.candidates()
    saliency = np.random.default_rng(2).lognormal(size=len(lay))
    deltas = group_latency_deltas_ms(lay, predictor, state.spec())
    off = rank(lay, cand, saliency, delta_ms=None, latency_weight=1.0)
    assert off.eta_eff == 0.0 and (off.scores == saliency[cand]).all()

    def first_k(weight: float, k: int = 20) -> tuple[float, float]:
        order = rank(lay, cand, saliency, delta_ms=deltas, latency_weight=weight).order()
        trial, taken = PruneState(lay), []
        for i in order:
            if len(taken) == k:
                break
            if trial.removable(int(i)):
                trial.remove(int(i))
                taken.append(int(i))
        return float(deltas[taken].mean()), predictor.predict_ms(trial.spec())

    saved = [first_k(w) for w in (0.0, 0.5, 2.0, 8.0)]
    mean_delta = [s[0] for s in saved]
    latency_after = [s[1] for s in saved]
    # more weight on latency: the first groups pruned save more time each, and the model gets faster
    assert mean_delta == sorted(mean_delta) and mean_delta[-1] > 2 * mean_delta[0]
    assert latency_after == sorted(latency_after, reverse=True)
    # equal saliency: the group that saves more time scores lower
    flat = np.ones(len(lay))
    r = rank(lay, cand, flat, delta_ms=deltas, latency_weight=1.0)
    assert r.order()[0] == cand[np.argmax(deltas[cand])]


def test_non_finite_latency_delta_of_a_candidate_is_an_error() -> None:
    lay = layout()
    deltas = np.ones(len(lay))
    bad = int(lay.indices_of(GroupKind.QK, block=3)[1])
    deltas[bad] = np.nan
    with pytest.raises(PruneError, match=r"no finite ΔLat for block 3 qk\[8:16\]"):
        rank(lay, np.arange(len(lay)), np.ones(len(lay)), delta_ms=deltas, latency_weight=1.0)
