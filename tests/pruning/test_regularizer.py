"""Latency regularizer: per-gate ΔLat against whole-model predictions, a unit-free η fixed for the run, the knapsack."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nvit.lut.base import FlopsPredictor
from nvit.presets import preset
from nvit.pruning.groups import GroupKind, GroupLayout, Minimums, PruneError
from nvit.pruning.knapsack import knapsack_order
from nvit.pruning.regularizer import LatencyTradeoff, gate_latency_deltas_ms, rank, unit_free_eta
from nvit.pruning.state import PruneState

SPEC = preset("vit_test")


def layout() -> GroupLayout:
    return GroupLayout(SPEC, group_size=8, minimums=Minimums(embed_dim=16))


def pruned_state(lay: GroupLayout, n: int, seed: int) -> PruneState:
    state = PruneState(lay)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        cand = state.candidates(rng.random(lay.num_units))
        state.remove(cand.units[rng.integers(len(cand))])
    return state


def test_gate_deltas_equal_whole_model_predictions_at_current_widths() -> None:
    lay = layout()
    predictor = FlopsPredictor(SPEC, reference_ms=4.0)
    state = pruned_state(lay, 40, seed=0)
    deltas = gate_latency_deltas_ms(lay, predictor, state.widths)
    now = predictor.predict_ms(state.spec())
    cand = state.candidates(np.zeros(lay.num_units))
    for pos in range(len(cand)):
        after = PruneState(lay, state.alive)
        after.remove(cand.units[pos])
        assert deltas[cand.gate[pos]] == pytest.approx(now - predictor.predict_ms(after.spec()), rel=1e-9, abs=1e-12)
    # an EMB group saves latency in every block, more than any one MLP group
    emb, mlp = lay.gates_of(GroupKind.EMB)[0], lay.gates_of(GroupKind.MLP, block=0)[0]
    assert deltas[emb] > deltas[mlp] > 0


def test_eta_is_unit_free() -> None:
    rng = np.random.default_rng(1)
    sal, lat = rng.lognormal(size=50), rng.lognormal(size=50) * 0.01
    assert unit_free_eta(sal, lat, latency_weight=2.0) == pytest.approx(2.0 * np.median(sal) / np.median(lat))
    assert unit_free_eta(sal, lat, latency_weight=0.0) == 0.0
    lay = layout()
    state = PruneState(lay)
    scores = rng.lognormal(size=lay.num_units)
    cand = state.candidates(scores)
    deltas = gate_latency_deltas_ms(lay, FlopsPredictor(SPEC, reference_ms=4.0), state.widths)
    base = rank(lay, cand, delta_ms=deltas, tradeoff=LatencyTradeoff(1.0)).order()
    # the loss in other units and latency in seconds instead of ms: the same ranking
    rescaled = state.candidates(scores * 1e3)
    again = rank(lay, rescaled, delta_ms=deltas * 1e-3, tradeoff=LatencyTradeoff(1.0)).order()
    np.testing.assert_array_equal(base, again)
    off = rank(lay, cand, delta_ms=None, tradeoff=None)
    assert off.eta == 0.0 and (off.scores == cand.saliency).all()


def test_eta_does_not_jump_when_the_mix_of_candidate_types_changes() -> None:
    """η is fixed at the first pruning step. Re-taken at every step (the old rule), the MLP groups — most of
    the candidates — set both medians; once they are pruned to their minimum the medians move to the
    attention and embedding groups and η changes several-fold within the run."""
    lay = layout()
    predictor = FlopsPredictor(SPEC, reference_ms=4.0)
    scores = np.random.default_rng(2).lognormal(size=lay.num_units)
    tradeoff = LatencyTradeoff(1.0)
    state = PruneState(lay)
    mixes, etas, stepwise = [], [], []
    for _ in range(2):
        cand = state.candidates(scores)
        deltas = gate_latency_deltas_ms(lay, predictor, state.widths)
        etas.append(rank(lay, cand, delta_ms=deltas, tradeoff=tradeoff).eta)
        stepwise.append(unit_free_eta(cand.saliency, deltas[cand.gate], 1.0))
        mixes.append(np.bincount(lay.gate_kind[cand.gate], minlength=5) / len(cand))
        for pos in np.flatnonzero(lay.gate_kind[cand.gate] == 4):  # then every MLP gate goes to its minimum
            state.remove(cand.units[pos])
    assert mixes[0][4] > 0.8 and mixes[1][4] == 0  # the candidate mix changed completely ...
    assert etas[1] == etas[0] > 0  # ... and η did not move
    assert max(stepwise) / min(stepwise) > 3  # what a per-step scale would have done
    restored = LatencyTradeoff(1.0, eta=etas[0])  # a resumed run keeps its η
    assert restored.fix(np.ones(3), np.ones(3)) == etas[0]


def test_regularizer_prunes_latency_expensive_groups_first() -> None:
    lay = layout()
    predictor = FlopsPredictor(SPEC, reference_ms=4.0)
    state = PruneState(lay)
    cand = state.candidates(np.random.default_rng(2).lognormal(size=lay.num_units))
    deltas = gate_latency_deltas_ms(lay, predictor, state.widths)

    def first_k(weight: float, k: int = 20) -> tuple[float, float]:
        order = rank(lay, cand, delta_ms=deltas, tradeoff=LatencyTradeoff(weight)).order()
        trial, taken = PruneState(lay), []
        for pos in order[:k]:
            trial.remove(cand.units[pos])
            taken.append(deltas[cand.gate[pos]])
        return float(np.mean(taken)), predictor.predict_ms(trial.spec())

    saved = [first_k(w) for w in (0.0, 0.5, 2.0, 8.0)]
    mean_delta = [s[0] for s in saved]
    latency_after = [s[1] for s in saved]
    # more weight on latency: the first groups pruned save more time each, and the model gets faster
    assert mean_delta == sorted(mean_delta) and mean_delta[-1] > 2 * mean_delta[0]
    assert latency_after == sorted(latency_after, reverse=True)


def test_non_finite_latency_delta_of_a_candidate_is_an_error() -> None:
    lay = layout()
    state = PruneState(lay)
    deltas = np.ones(len(lay.gates))
    deltas[lay.gates_of(GroupKind.QK, block=3)[0]] = np.nan
    with pytest.raises(PruneError, match="no finite ΔLat for block 3 qk"):
        rank(lay, state.candidates(np.ones(lay.num_units)), delta_ms=deltas, tradeoff=LatencyTradeoff(1.0))


def test_knapsack_removes_the_least_saliency_that_meets_the_quota() -> None:
    lay = layout()
    state = PruneState(lay)
    rng = np.random.default_rng(3)
    scores = rng.lognormal(size=lay.num_units)
    cand = state.candidates(scores)
    gate_deltas = gate_latency_deltas_ms(lay, FlopsPredictor(SPEC, reference_ms=4.0), state.widths)
    # a small problem to brute-force: three gates, up to three groups each
    gates = [lay.gates_of(GroupKind.MLP, block=0)[0], lay.gates_of(GroupKind.HEAD, block=1)[0], 0]
    keep = np.flatnonzero(np.isin(cand.gate, gates) & (cand.rank < 3))
    small = type(cand)(cand.gate[keep], cand.rank[keep], cand.saliency[keep], tuple(cand.units[i] for i in keep))
    delta = gate_deltas[small.gate]
    quota = 0.6 * float(delta.sum())
    order = knapsack_order(small, delta, quota, bins=4096)
    total, chosen = 0.0, []
    for pos in order:  # what the loop does: remove in order until the quota is met
        if total >= quota:
            break
        chosen.append(int(pos))
        total += delta[pos]
    best = np.inf
    for ks in itertools.product(range(4), repeat=3):  # prefixes of each gate's groups, by rank
        sel = [i for i in range(len(small)) if small.rank[i] < ks[gates.index(small.gate[i])]]
        if delta[sel].sum() >= quota:
            best = min(best, small.saliency[sel].sum())
    assert small.saliency[chosen].sum() == pytest.approx(best, rel=1e-3)
    assert sorted(order.tolist()) == list(range(len(small)))  # every candidate appears once
    # nothing reaches an impossible quota: everything that saves time comes first
    assert set(knapsack_order(small, delta, 10 * float(delta.sum()))[:len(small)].tolist()) == set(range(len(small)))
