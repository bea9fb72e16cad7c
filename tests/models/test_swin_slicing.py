"""Swin slicing: the gated Swin with removed units zeroed computes what the sliced smaller dense Swin computes
(every group: a stage's embedding channels through merging, heads with their bias columns, QK, V, MLP and whole
sub-layers), and the gates read back as the same kept indices."""

from __future__ import annotations

import pytest
import torch

from nvit.arch import BlockSpec
from nvit.errors import SpecError
from nvit.models.slicing import BlockKeep
from nvit.models.swin import build_swin
from nvit.models.swin_slicing import SwinKeep, apply_swin_keep, keep_from_swin_gates, slice_swin
from nvit.swin import SwinSpec, SwinStage

SPEC = SwinSpec(stages=(SwinStage(24, (BlockSpec(3, 8, 8, 48), BlockSpec(3, 8, 8, 48))),
                        SwinStage(40, (BlockSpec(4, 8, 8, 80), BlockSpec(4, 8, 8, 80))),
                        SwinStage(48, (BlockSpec(2, 8, 8, 64),))),
                img_size=16, patch_size=1, in_chans=1, num_classes=10, window_size=4, name="three stages")


def _subset(n: int, keep: int, gen: torch.Generator) -> tuple[int, ...]:
    return tuple(sorted(torch.randperm(n, generator=gen)[:keep].tolist()))


def _keep(gen: torch.Generator) -> SwinKeep:
    stages = []
    for s, stage in enumerate(SPEC.stages):
        blocks = []
        for j, b in enumerate(stage.blocks):
            heads = _subset(b.heads, b.heads - 1, gen)
            qk, v, mlp = _subset(b.qk_dim, 5, gen), _subset(b.v_dim, 6, gen), _subset(b.mlp_dim, b.mlp_dim // 2, gen)
            if (s, j) == (0, 1):
                heads, qk, v = (), (), ()  # the attention sub-layer goes
            if (s, j) == (1, 0):
                mlp = ()  # the MLP sub-layer goes
            blocks.append(BlockKeep(heads, qk, v, mlp))
        stages.append((_subset(stage.embed_dim, stage.embed_dim - 8, gen), tuple(blocks)))
    from nvit.models.swin_slicing import StageKeep

    return SwinKeep(tuple(StageKeep(e, b) for e, b in stages))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_sliced_swin_computes_what_the_gated_one_computes(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = build_swin(SPEC, seed=seed).double().eval()
    with torch.no_grad():  # biases and norms away from their init, so a wrong index shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    keep = _keep(gen)
    apply_swin_keep(model, keep)
    assert keep_from_swin_gates(model) == keep.validated(SPEC)
    small = slice_swin(model)
    assert small.spec.stages[0].embed_dim == 16 and small.spec.stages[0].blocks[1] == BlockSpec(0, 0, 0, 24)
    assert small.spec.stages[1].blocks[0] == BlockSpec(3, 5, 6, 0) and small.spec.qk_scale == pytest.approx(8**-0.5)
    assert small.spec.num_params() == sum(p.numel() for p in small.parameters())
    images = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(images), small(images), atol=1e-10, rtol=1e-10)
    model.disable_gates()
    with torch.no_grad():  # without the gates the full model computes something else
        assert not torch.allclose(model(images), small(images), atol=1e-3)


def test_gates_are_listed_in_order_and_a_block_cannot_be_dropped() -> None:
    model = build_swin(SPEC, seed=0)
    model.enable_gates()
    gates = model.gate_parameters()
    assert [g.numel() for g in gates[:7]] == [24, 3, 8, 8, 48, 1, 1]  # stage 0: emb, then block 0's gates
    assert len(model.weight_parameters()) + len(gates) == len(list(model.parameters()))
    full = SwinKeep.full(SPEC)
    stage = full.stages[2]
    gone = SwinKeep((*full.stages[:2], type(stage)(stage.emb, (BlockKeep((), (), (), ()),))))
    with pytest.raises(SpecError, match="stage 2 block 0 would keep neither sub-layer"):
        slice_swin(model, gone)
