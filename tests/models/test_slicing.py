"""Slicing oracle: the smaller dense model computes what the gated model with removed units zeroed computes."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import SpecError
from nvit.models import BlockKeep, KeepIndices, apply_keep_as_gates, build_model, keep_from_gates, slice_model


def nonuniform_spec(seed: int, distilled: bool) -> ArchSpec:
    """Random per-block widths; odd seeds share one qk_dim (default scale), even seeds fix qk_scale."""
    rng = random.Random(seed)
    shared_qk = rng.randint(4, 12)
    blocks = tuple(
        BlockSpec(heads=rng.randint(2, 4), qk_dim=shared_qk if seed % 2 else rng.randint(4, 12),
                  v_dim=rng.randint(4, 12), mlp_dim=rng.randint(16, 48))
        for _ in range(3)
    )
    return ArchSpec(embed_dim=rng.randint(24, 40), blocks=blocks, img_size=8, patch_size=2, in_chans=2,
                    num_classes=7, distilled=distilled, qk_scale=None if seed % 2 else 0.3)


def random_keep(spec: ArchSpec, seed: int) -> KeepIndices:
    rng = random.Random(1000 + seed)

    def subset(n: int) -> tuple[int, ...]:
        return tuple(sorted(rng.sample(range(n), rng.randint(1, n))))

    return KeepIndices(
        emb=subset(spec.embed_dim),
        blocks=tuple(BlockKeep(subset(b.heads), subset(b.qk_dim), subset(b.v_dim), subset(b.mlp_dim))
                     for b in spec.blocks),
    )


@pytest.mark.parametrize("seed", range(6))
def test_sliced_model_equals_masked_model(seed: int) -> None:
    spec = nonuniform_spec(seed, distilled=seed % 2 == 1)
    model = build_model(spec, seed=seed).eval()
    with torch.no_grad():  # non-trivial norms so that slicing them wrongly would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    keep = random_keep(spec, seed)
    apply_keep_as_gates(model, keep)
    small = slice_model(model).eval()

    assert small.spec.embed_dim == len(keep.emb)
    assert [b.heads for b in small.spec.blocks] == [len(k.heads) for k in keep.blocks]
    assert [b.mlp_dim for b in small.spec.blocks] == [len(k.mlp) for k in keep.blocks]
    assert sum(p.numel() for p in small.parameters()) == small.spec.num_params()
    assert small.spec.qk_scale is not None  # the dense model's scale survives QK pruning

    x = torch.randn(5, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)


def test_masked_output_differs_from_dense_so_the_oracle_can_fail() -> None:
    spec = nonuniform_spec(11, distilled=False)
    model = build_model(spec, seed=11).eval()
    x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        dense = model(x)
        apply_keep_as_gates(model, random_keep(spec, 11))
        masked = model(x)
    assert (dense - masked).abs().max() > 1e-3


def test_full_keep_is_identity_and_gates_round_trip() -> None:
    spec = nonuniform_spec(3, distilled=False)
    model = build_model(spec, seed=3).eval()
    keep = random_keep(spec, 3)
    apply_keep_as_gates(model, keep)
    assert keep_from_gates(model) == keep.validated(spec)
    dense = build_model(spec, seed=3).eval()
    same = slice_model(dense, KeepIndices.full(spec))
    x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        torch.testing.assert_close(same(x), dense(x))


def test_bad_keep_indices_are_errors() -> None:
    spec = nonuniform_spec(4, distilled=False)
    full = KeepIndices.full(spec)
    bad_emb = KeepIndices(emb=(0, spec.embed_dim), blocks=full.blocks)
    with pytest.raises(SpecError, match="embedding channels"):
        bad_emb.validated(spec)
    empty_qk = KeepIndices(emb=full.emb, blocks=(replace(full.blocks[0], qk=()), *full.blocks[1:]))
    with pytest.raises(SpecError, match="block 0 qk channels: at least one"):
        empty_qk.validated(spec)
    nothing = KeepIndices(emb=full.emb, blocks=tuple(replace(b, heads=(), mlp=()) for b in full.blocks))
    with pytest.raises(SpecError, match="remove every block"):
        nothing.validated(spec)


def test_slicing_qk_with_per_block_default_scales_is_refused() -> None:
    spec = ArchSpec(embed_dim=16, blocks=(BlockSpec(2, 4, 4, 8), BlockSpec(2, 8, 4, 8)), img_size=4,
                    patch_size=2, num_classes=3)
    full = KeepIndices.full(spec)
    keep = KeepIndices(emb=full.emb, blocks=(replace(full.blocks[0], qk=(0, 1)), full.blocks[1]))
    with pytest.raises(SpecError, match="qk_scale"):
        slice_model(build_model(spec), keep)
    # keeping every QK channel needs no fixed scale
    sliced = slice_model(build_model(spec), KeepIndices(emb=full.emb[:8], blocks=full.blocks))
    assert sliced.spec.qk_scale is None and sliced.spec.embed_dim == 8
