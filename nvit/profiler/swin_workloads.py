"""Torch modules the profiler times for a Swin table, built from the model's own classes (:mod:`nvit.models.swin`).

- a stage's blocks: :class:`~nvit.models.swin.SwinBlock` at the stage's resolution and window, with the widths
  of the row (an attention half is a block that kept only its attention, an MLP half one that kept only its
  MLP: the same computation as ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``), fed ``[batch, R, R, e]``.
  Blocks are timed unshifted: the shifted ones (every other block of a stage with several windows) add a
  roll and a mask, which the whole-model calibration absorbs;
- the skeleton (``fixed`` rows): the whole Swin with every stage's blocks removed (patch embedding, merging
  layers, final norm, pooling, head), the row's stage at the row's width, fed images;
- a whole Swin, for calibration and checks.
"""

from __future__ import annotations

import dataclasses

from nvit.arch import BlockSpec
from nvit.profiler.base import Workload
from nvit.profiler.swin_space import StagePart
from nvit.swin import SwinSpec
from nvit.vocab import PartKind

#: Seed of the random weights of timed modules (values do not change latency).
WEIGHT_SEED = 0


def skeleton_spec(base: SwinSpec, stage: int, embed_dim: int) -> SwinSpec:
    """``base`` with ``stage`` at ``embed_dim`` (its blocks are irrelevant to the skeleton)."""
    stages = tuple(dataclasses.replace(s, embed_dim=embed_dim) if i == stage else s for i, s in enumerate(base.stages))
    return dataclasses.replace(base, stages=stages, name=f"{base.name or 'swin'}-skeleton-s{stage}-e{embed_dim}")


def _block_spec(part: StagePart) -> BlockSpec:
    c = part.config
    if c.kind in (PartKind.ATTN, PartKind.ATTN_BLOCK):
        return BlockSpec(c.heads, c.qk_dim, c.v_dim, 0)
    if c.kind in (PartKind.MLP, PartKind.MLP_BLOCK):
        return BlockSpec(0, 0, 0, c.mlp_dim)
    return BlockSpec(c.heads, c.qk_dim, c.v_dim, c.mlp_dim)


def swin_part_module(part: StagePart, base: SwinSpec, *, seed: int = WEIGHT_SEED):
    """The eval-mode module timed for ``part``; it carries the part as ``nvit_config`` and the Swin as
    ``nvit_base``."""
    import torch

    from nvit.models.swin import SwinBlock, SwinTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if part.config.kind is PartKind.FIXED:
            module = SwinTransformer(skeleton_spec(base, part.stage, part.config.embed_dim))
            for layer in module.layers:
                layer.blocks = torch.nn.ModuleList()
        else:
            spec = _block_spec(part)
            module = SwinBlock(embed_dim=part.config.embed_dim, spec=spec, resolution=base.resolution(part.stage),
                               window=base.window(part.stage), shift=0, scale=base.block_scale(spec),
                               eps=base.layer_norm_eps)
    module.nvit_config = part
    module.nvit_base = base
    return module.eval()


def swin_part_input_shape(part: StagePart, base: SwinSpec, batch_size: int) -> tuple[int, ...]:
    if part.config.kind is PartKind.FIXED:
        return (batch_size, base.in_chans, base.img_size, base.img_size)
    r = base.resolution(part.stage)
    return (batch_size, r, r, part.config.embed_dim)


def swin_part_workload(part: StagePart, base: SwinSpec, batch_size: int) -> Workload:
    """What the backend times for one row of a Swin table."""
    return Workload(name=part.key, module=swin_part_module(part, base),
                    input_shape=swin_part_input_shape(part, base, batch_size))


def swin_model_workload(spec: SwinSpec, batch_size: int, *, name: str | None = None) -> Workload:
    """A whole Swin (random weights, seeded)."""
    from nvit.models.swin import build_swin

    return Workload(name=name or f"model:{spec.name or 'swin'}", module=build_swin(spec, seed=WEIGHT_SEED).eval(),
                    input_shape=(batch_size, spec.in_chans, spec.img_size, spec.img_size))
