"""The pruning benchmark's own pieces: one-shot baselines by their documented rules, and the curve statistics."""

from __future__ import annotations

import numpy as np
import prune_methods as pm
import prune_stats as st
import pytest
import torch

from nvit.lut.base import FlopsPredictor
from nvit.models import build_model
from nvit.presets import preset
from nvit.pruning.groups import GroupKind, GroupLayout, Minimums
from nvit.pruning.state import PruneState

SPEC = preset("vit_test")


def test_l1_scores_average_every_parameter_a_unit_owns() -> None:
    model = build_model(SPEC, seed=4)
    lay = GroupLayout(SPEC, group_size=8, minimums=Minimums(embed_dim=16))
    scores = pm.l1_unit_scores(model, lay)
    # an MLP neuron owns its fc1 row and bias and its fc2 column
    mlp = model.blocks[2].mlp
    owned = [mlp.fc1.weight[9], mlp.fc1.bias[9:10], mlp.fc2.weight[:, 9]]
    expected = sum(float(t.detach().double().abs().sum()) for t in owned) / sum(t.numel() for t in owned)
    assert scores[lay.units_of(lay.gates_of(GroupKind.MLP, block=2)[0])[9]] == pytest.approx(expected, rel=1e-9)
    # a head owns its Q, K and V rows and biases and its proj columns
    attn = model.blocks[1].attn
    rows = torch.cat([torch.arange(16, 32) + k * 64 for k in range(3)])  # head 1 of 4 heads x 16, in Q, K and V
    owned = [attn.qkv.weight[rows], attn.qkv.bias[rows], attn.proj.weight[:, 16:32]]
    expected = sum(float(t.detach().double().abs().sum()) for t in owned) / sum(t.numel() for t in owned)
    assert scores[lay.units_of(lay.gates_of(GroupKind.HEAD, block=1)[0])[1]] == pytest.approx(expected, rel=1e-9)


def test_one_shot_baselines_meet_the_target_by_their_rules() -> None:
    model = build_model(SPEC, seed=5)
    lay = GroupLayout(SPEC, group_size=8, minimums=Minimums(embed_dim=16))
    scores = pm.l1_unit_scores(model, lay)
    predictor = FlopsPredictor(SPEC, reference_ms=4.0)
    target = 2.0
    uniform = pm.uniform_to_target(lay, scores, predictor, target)
    assert predictor.predict_ms(uniform.spec()) <= target and len(set(uniform.spec().blocks)) == 1
    kept = uniform.keep_indices().blocks[0].mlp  # the highest-scoring neurons of each gate stay
    mlp_scores = scores[lay.units_of(lay.gates_of(GroupKind.MLP, block=0)[0])]
    assert set(kept) == set(np.argsort(-mlp_scores, kind="stable")[: len(kept)].tolist())
    greedy = pm.greedy_to_target(lay, scores, predictor, target)
    assert predictor.predict_ms(greedy.spec()) <= target
    # it stops at the crossing: one group fewer and the model is above the target
    fewer = PruneState(lay)
    for _ in range(greedy.num_pruned // 8 + 8):
        if predictor.predict_ms(fewer.spec()) <= target:
            break
        cand = fewer.candidates(scores)
        mean = cand.saliency / np.array([len(u) for u in cand.units])
        last = cand.units[int(np.lexsort((cand.rank, cand.gate, mean))[0])]
        before = fewer.spec()
        fewer.remove(last)
    assert predictor.predict_ms(before) > target and fewer.spec() == greedy.spec()


def test_curves_are_compared_on_their_common_range_with_paired_intervals() -> None:
    a = st.curve([(2.0, 0.80), (1.0, 0.60)])  # top1 = 0.4 + 0.2 x on [1, 2]
    b = st.curve([(3.0, 0.90), (1.5, 0.50)])
    assert st.common_range([a, b]) == (1.5, 2.0)
    assert st.mean_over(a, 1.5, 2.0) == pytest.approx(0.4 + 0.2 * 1.75)  # linear: the midpoint's value
    with pytest.raises(ValueError, match="share no latency range"):
        st.common_range([st.curve([(1.0, 0.5), (2.0, 0.6)]), st.curve([(3.0, 0.5), (4.0, 0.6)])])
    p = st.paired([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert p.mean == 2.0 and p.high - p.mean == pytest.approx(4.3027 / np.sqrt(3), rel=1e-4)
    assert np.isnan(st.paired([1.0]).low)
    curves = {"ref": {0: a, 1: a}, "other": {0: b, 1: st.curve([(3.0, 0.95), (1.5, 0.55)])}}
    out = st.compare_methods(curves, "ref", points=3)
    assert out["range_ms"] == [1.5, 2.0] and out["latencies_ms"] == [1.5, 1.75, 2.0]
    diff = out["methods"]["other"]["vs_reference_mean_top1"]
    b_mean = 0.5 + (0.4 / 1.5) * 0.25  # b at 1.75
    assert diff["mean"] == pytest.approx((b_mean + b_mean + 0.05) / 2 - 0.75) and diff["n"] == 2
