"""Units, gates, minimums, dynamic groups, and masks to gates and to a sliced model that computes the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.models import build_model, keep_from_gates, slice_model
from nvit.presets import preset
from nvit.pruning.groups import GroupKind, GroupLayout, Minimums, PruneError
from nvit.pruning.state import PruneState


def layout(group_size: int = 8, min_embed: int = 16) -> GroupLayout:
    return GroupLayout(preset("vit_test"), group_size=group_size, minimums=Minimums(embed_dim=min_embed))


def test_layout_gates_units_and_flat_order() -> None:
    lay = layout()
    # vit_test: e=64, 4 blocks of 4 heads x 16 (q and v), mlp 256, and each block's two sub-layer gates:
    # 1 + 4 x 6 gates, 64 + 4 x 294 units
    assert len(lay.gates) == 25 and lay.num_units == 64 + 4 * (4 + 16 + 16 + 256 + 2)
    assert [lay.gates[j].name for j in range(8)] == [
        "emb", "block 0 head", "block 0 qk", "block 0 v", "block 0 mlp", "block 0 attn_layer", "block 0 mlp_layer",
        "block 1 head"]
    assert lay.unit_name(64 + 4 + 16 + 16 + 17) == "block 0 mlp 17"
    model = build_model(preset("vit_test"), seed=0)
    model.enable_gates()
    assert lay.gate_sizes == tuple(g.numel() for g in model.gate_parameters())
    assert list(lay.gate_group) == [8] + [1, 8, 8, 8, 1, 1] * 4
    assert (np.bincount(lay.unit_gate) == lay.gate_sizes).all() and (np.diff(lay.unit_gate) >= 0).all()


def test_widths_must_be_whole_groups_and_minimums_must_fit() -> None:
    spec = ArchSpec(embed_dim=32, blocks=(BlockSpec(2, 8, 12, 32),), img_size=4, patch_size=2, num_classes=3)
    with pytest.raises(PruneError, match="block 0 v_dim 12 is not a multiple of group_size 8"):
        GroupLayout(spec, group_size=8)
    GroupLayout(spec, group_size=4, minimums=Minimums(embed_dim=8))
    with pytest.raises(PruneError, match="minimum embed_dim 64 exceeds the model's embed_dim 32"):
        GroupLayout(spec, group_size=4, minimums=Minimums(embed_dim=64))
    with pytest.raises(PruneError, match="minimum mlp_dim 40 exceeds block 0's mlp_dim 32"):
        GroupLayout(spec, group_size=4, minimums=Minimums(mlp_dim=37))  # rounded up to whole groups
    with pytest.raises(PruneError, match="minimum heads must be a positive integer"):
        Minimums(heads=0)
    assert Minimums().of(GroupKind.QK, 8) == 8 and Minimums(qk_dim=9).of(GroupKind.QK, 8) == 16


def test_dynamic_groups_take_the_lowest_scoring_alive_units_of_each_gate() -> None:
    lay = layout()
    state = PruneState(lay)
    scores = np.random.default_rng(0).random(lay.num_units)
    cand = state.candidates(scores)
    mlp = lay.gates_of(GroupKind.MLP, block=2)[0]
    units = lay.units_of(mlp)
    ordered = units[np.argsort(scores[units])]
    mine = np.flatnonzero(cand.gate == mlp)
    assert len(mine) == 31  # 32 groups of 8, one must stay
    for pos in mine:
        k = cand.rank[pos]
        np.testing.assert_array_equal(np.sort(cand.units[pos]), np.sort(ordered[8 * k: 8 * k + 8]))
        assert cand.saliency[pos] == pytest.approx(scores[cand.units[pos]].sum())
    # heads go one at a time, three of four may go; EMB down to its minimum of 16 = 6 groups
    heads = np.flatnonzero(cand.gate == lay.gates_of(GroupKind.HEAD, block=1)[0])
    assert len(heads) == 3 and all(len(cand.units[p]) == 1 for p in heads)
    assert (cand.gate == 0).sum() == 6
    # removing the first group: the next candidates of that gate come from the units left
    first = cand.units[mine[cand.rank[mine] == 0][0]]
    state.remove(first)
    again = state.candidates(scores)
    mine = np.flatnonzero(again.gate == mlp)
    assert len(mine) == 30 and not any(np.isin(again.units[p], first).any() for p in mine)
    np.testing.assert_array_equal(np.sort(again.units[mine[again.rank[mine] == 0][0]]), np.sort(ordered[8:16]))
    # a group that holds one important unit no longer protects its neighbours: a fixed chunk would
    lay1 = layout()
    s = np.ones(lay1.num_units)
    gate = lay1.units_of(lay1.gates_of(GroupKind.MLP, block=0)[0])
    s[gate[:8]] = 0.0
    s[gate[3]] = 100.0  # one important unit inside the first chunk
    c = PruneState(lay1).candidates(s)
    best = c.units[int(np.argmin(np.where(c.gate == lay1.gates_of(GroupKind.MLP, block=0)[0], c.saliency, np.inf)))]
    assert gate[3] not in best and set(gate[:8]) - {gate[3]} <= set(best.tolist())


def test_removal_updates_widths_and_respects_every_minimum() -> None:
    lay = layout(min_embed=48)
    state = PruneState(lay)
    head_gate = lay.gates_of(GroupKind.HEAD, block=1)[0]
    heads = lay.units_of(head_gate)
    for u in heads[:3]:
        state.remove(np.array([u]))
    assert state.spec().blocks[1].heads == 1 and not state.can_remove(heads[3:])
    qk = lay.units_of(lay.gates_of(GroupKind.QK, block=0)[0])
    state.remove(qk[[1, 3, 5, 7, 9, 11, 13, 15]])  # any 8 channels: groups need not be contiguous
    assert state.spec().blocks[0].qk_dim == 8 and not state.can_remove(qk[[0, 2, 4, 6, 8, 10, 12, 14]])
    emb = lay.units_of(0)
    state.remove(emb[:8])
    state.remove(emb[8:16])
    assert state.spec().embed_dim == 48 and state.removable_groups()[0] == 0
    with pytest.raises(PruneError, match="cannot be removed as one group"):
        state.remove(emb[16:24])  # at the minimum
    with pytest.raises(PruneError, match="cannot be removed as one group"):
        state.remove(heads[:1])  # already pruned
    mlp = lay.units_of(lay.gates_of(GroupKind.MLP, block=3)[0])
    assert not state.can_remove(mlp[:7]) and not state.can_remove(np.concatenate([mlp[:4], qk[[0, 2, 4, 6]]]))
    assert state.removed_by_kind() == {"emb": 16, "head": 3, "qk": 8, "v": 0, "mlp": 0, "attn_layer": 0,
                                       "mlp_layer": 0}
    assert state.num_pruned == 27


def test_pruning_everything_reaches_the_minimal_spec() -> None:
    lay = layout(min_embed=24)
    state = PruneState(lay)
    scores = np.random.default_rng(1).random(lay.num_units)
    while len(cand := state.candidates(scores)):
        state.remove(cand.units[0])
    assert state.spec() == lay.minimal_spec()
    assert lay.minimal_spec().embed_dim == 24 and lay.minimal_spec().blocks[0] == BlockSpec(1, 8, 8, 8)
    assert (PruneState(lay, state.alive).alive == state.alive).all()  # masks round-trip
    bad = state.alive.copy()
    bad[lay.units_of(lay.gates_of(GroupKind.MLP, block=0)[0])] = False
    with pytest.raises(PruneError, match="below its minimum"):
        PruneState(lay, bad)
    partial = np.ones(lay.num_units, dtype=bool)
    partial[lay.units_of(lay.gates_of(GroupKind.MLP, block=0)[0])[:3]] = False
    with pytest.raises(PruneError, match="partial group"):
        PruneState(lay, partial)


def test_dynamically_grouped_model_slices_exactly() -> None:
    spec = preset("vit_test")
    model = build_model(spec, seed=3).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong slice would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    lay = GroupLayout(spec, group_size=8, minimums=Minimums(embed_dim=16))
    state = PruneState(lay)
    rng = np.random.default_rng(0)
    for _ in range(6):  # scores change at every step, so groups are scattered, non-contiguous units
        cand = state.candidates(rng.random(lay.num_units))
        for pos in rng.permutation(len(cand))[:15]:
            if state.can_remove(cand.units[pos]):
                state.remove(cand.units[pos])
    kept_mlp = state.keep_indices().blocks[0].mlp
    per_chunk = np.bincount(np.array(kept_mlp) // 8, minlength=32)
    assert ((per_chunk > 0) & (per_chunk < 8)).any()  # removed units are not whole fixed chunks of 8
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x)
        state.apply(model)
        gated = model(x)
    assert keep_from_gates(model) == state.keep_indices().validated(spec)
    small = slice_model(model).eval()
    assert small.spec.to_dict() == state.spec().to_dict()
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in build_model(spec).parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated, atol=1e-5, rtol=1e-4)
    assert (gated - dense).abs().max() > 1e-2  # the oracle can fail: pruning changed the outputs


def test_gates_are_binary_after_apply() -> None:
    lay = layout()
    state = PruneState(lay)
    mlp = lay.units_of(lay.gates_of(GroupKind.MLP, block=3)[0])
    chosen = mlp[[1, 5, 9, 40, 41, 100, 200, 255]]
    state.remove(chosen)
    model = build_model(preset("vit_test"), seed=0)
    state.apply(model)
    gate = model.blocks[3].mlp.gate.detach()
    assert set(gate.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(torch.nonzero(gate == 0).flatten(), torch.tensor([1, 5, 9, 40, 41, 100, 200, 255]))
