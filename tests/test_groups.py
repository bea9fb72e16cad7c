"""Prunable groups: layout, minimums, masks to gates and to a sliced model that computes the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvit.arch import ArchSpec, BlockSpec, preset
from nvit.models import build_model, keep_from_gates, slice_model
from nvit.pruning.groups import GroupKind, GroupLayout, Minimums, PruneError, PruneState


def layout(group_size: int = 8, min_embed: int = 16) -> GroupLayout:
    return GroupLayout(preset("vit_test"), group_size=group_size, minimums=Minimums(embed_dim=min_embed))


def test_layout_counts_names_and_flat_gate_order() -> None:
    lay = layout()
    # vit_test: e=64, 4 blocks of 4 heads x 16 (q and v), mlp 256 -> 8 EMB chunks + 4 x (4 + 2 + 2 + 32)
    assert len(lay) == 8 + 4 * (4 + 2 + 2 + 32)
    assert len(lay.indices_of(GroupKind.MLP, block=2)) == 32
    assert [lay.groups[i].name for i in (0, 8, 12, 14, 16)] == [
        "emb[0:8]", "block 0 head 0", "block 0 qk[0:8]", "block 0 v[0:8]", "block 0 mlp[0:8]"]
    model = build_model(preset("vit_test"), seed=0)
    model.enable_gates()
    assert lay.gate_sizes == tuple(g.numel() for g in model.gate_parameters())
    # unit -> group map covers the flat gate vector in order, each group contiguous and of its size
    counts = torch.bincount(lay.unit_group, minlength=len(lay)).numpy()
    assert (counts == lay.size).all() and lay.num_units == sum(lay.gate_sizes)
    assert (np.diff(lay.unit_group.numpy()) >= 0).all()


def test_widths_must_be_whole_groups_and_minimums_must_fit() -> None:
    spec = ArchSpec(embed_dim=32, blocks=(BlockSpec(2, 8, 12, 32),), img_size=4, patch_size=2, num_classes=3)
    with pytest.raises(PruneError, match="block 0 v_dim 12 is not a multiple of group_size 8"):
        GroupLayout(spec, group_size=8)
    GroupLayout(spec, group_size=4, minimums=Minimums(embed_dim=8))
    with pytest.raises(PruneError, match="minimum embed_dim 64 exceeds"):
        GroupLayout(spec, group_size=4)  # default minimum 64 > e=32
    with pytest.raises(PruneError, match="minimum heads must be at least 1"):
        Minimums(heads=0)


def test_removal_updates_widths_and_respects_every_minimum() -> None:
    lay = layout(min_embed=48)
    state = PruneState(lay)
    heads = lay.indices_of(GroupKind.HEAD, block=1)
    for i in heads[:3]:
        state.remove(int(i))
    assert state.spec().blocks[1].heads == 1 and not state.removable(int(heads[3]))
    qk = lay.indices_of(GroupKind.QK, block=0)
    state.remove(int(qk[1]))
    assert state.spec().blocks[0].qk_dim == 8 and not state.removable(int(qk[0]))
    emb = lay.indices_of(GroupKind.EMB)
    state.remove(int(emb[0]))
    state.remove(int(emb[5]))
    assert state.spec().embed_dim == 48 and not any(state.removable(int(i)) for i in emb)
    with pytest.raises(PruneError, match=r"emb\[8:16\] cannot be removed"):
        state.remove(int(emb[1]))
    with pytest.raises(PruneError, match="block 1 head 0 cannot be removed"):
        state.remove(int(heads[0]))  # already pruned
    cand = set(state.candidates().tolist())
    assert cand == {i for i in range(len(lay)) if state.removable(i)}
    assert not cand & {int(heads[3]), int(qk[0]), *emb.tolist()}


def test_pruning_everything_reaches_the_minimal_spec() -> None:
    lay = layout(min_embed=24)
    state = PruneState(lay)
    while (cand := state.candidates()).size:
        state.remove(int(cand[-1]))
    assert state.spec() == lay.minimal_spec()
    assert lay.minimal_spec().embed_dim == 24 and lay.minimal_spec().blocks[0] == BlockSpec(1, 8, 8, 8)
    # masks round-trip; a mask below a minimum is refused
    assert (PruneState(lay, state.alive).alive == state.alive).all()
    bad = state.alive.copy()
    bad[lay.indices_of(GroupKind.MLP, block=0)] = False
    with pytest.raises(PruneError, match="below its minimum"):
        PruneState(lay, bad)


def test_pruned_and_sliced_model_equals_gated_model() -> None:
    spec = preset("vit_test")
    model = build_model(spec, seed=3).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong slice would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    lay = GroupLayout(spec, group_size=8, minimums=Minimums(embed_dim=16))
    state = PruneState(lay)
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(lay))[:90]:
        if state.removable(int(i)):
            state.remove(int(i))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x)
        state.apply(model)
        gated = model(x)
    assert keep_from_gates(model) == state.keep_indices().validated(spec)
    small = slice_model(model).eval()
    assert small.spec.to_dict() == state.spec().to_dict()
    assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in build_model(spec).parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated, atol=1e-5, rtol=1e-4)
    assert (gated - dense).abs().max() > 1e-2  # the oracle can fail: pruning changed the outputs


def test_gates_are_binary_after_apply_and_chunks_are_whole() -> None:
    lay = layout()
    state = PruneState(lay)
    mlp = lay.indices_of(GroupKind.MLP, block=3)
    state.remove(int(mlp[5]))
    model = build_model(preset("vit_test"), seed=0)
    state.apply(model)
    gate = model.blocks[3].mlp.gate.detach()
    assert set(gate.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(torch.nonzero(gate == 0).flatten(), torch.arange(40, 48))
    assert state.pruned_names() == ["block 3 mlp[40:48]"]
