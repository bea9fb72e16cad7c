"""Torch modules the profiler times, built from the model's own classes (:mod:`nvit.models.vit`).

A LUT is only as good as the match between what was timed and what is deployed, so every workload reuses
the exact modules of :class:`~nvit.models.vit.VisionTransformer`:

- attention half of a block: ``x + attn(norm1(x))``;
- MLP half of a block: ``x + mlp(norm2(x))``;
- a full block (:class:`~nvit.models.vit.Block`), and a block that kept only its attention or only its
  MLP (the same class with the other sub-layer absent: what a pruned model with a removed sub-layer runs);
- fixed parts: the whole ViT with its block list emptied (patch embedding, class/distillation tokens,
  position embedding, final norm and head(s)), fed images;
- a whole model, for calibration and end-to-end checks.

Block parts take ``[batch, tokens, embed_dim]``; fixed parts and whole models take images
``[batch, in_chans, img_size, img_size]``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from nvit.arch import ArchSpec, BlockSpec
from nvit.profiler.base import Workload
from nvit.vocab import PartConfig, PartKind

if TYPE_CHECKING:
    import torch

#: Seed of the random weights of timed modules (values do not change latency; fixed for reproducibility).
WEIGHT_SEED = 0


def _modules():
    """The torch classes, imported lazily so that importing nvit.profiler stays cheap."""
    import torch
    from torch import nn

    from nvit.models import vit

    class AttentionPart(nn.Module):
        """The attention half of :class:`~nvit.models.vit.Block`: ``x + attn(norm1(x))``."""

        def __init__(self, *, embed_dim: int, heads: int, qk_dim: int, v_dim: int, eps: float) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(embed_dim, eps=eps)
            self.attn = vit.Attention(embed_dim=embed_dim, heads=heads, qk_dim=qk_dim, v_dim=v_dim,
                                      scale=qk_dim**-0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.attn(self.norm1(x))

    class MlpPart(nn.Module):
        """The MLP half of :class:`~nvit.models.vit.Block`: ``x + mlp(norm2(x))``."""

        def __init__(self, *, embed_dim: int, mlp_dim: int, eps: float) -> None:
            super().__init__()
            self.norm2 = nn.LayerNorm(embed_dim, eps=eps)
            self.mlp = vit.Mlp(embed_dim=embed_dim, mlp_dim=mlp_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm2(x))

    return torch, vit, AttentionPart, MlpPart


def fixed_parts_spec(base: ArchSpec, embed_dim: int) -> ArchSpec:
    """The base architecture at another embedding width (its blocks are irrelevant to the fixed parts)."""
    return replace(base, embed_dim=embed_dim, name=f"{base.name or 'custom'}-fixed-e{embed_dim}")


def build_part_module(config: PartConfig, base: ArchSpec, *, seed: int = WEIGHT_SEED):
    """The eval-mode torch module timed for ``config``; it carries ``config`` as ``nvit_config``."""
    torch, vit, attention_part, mlp_part = _modules()
    eps = base.layer_norm_eps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.kind is PartKind.ATTN:
            module = attention_part(embed_dim=config.embed_dim, heads=config.heads, qk_dim=config.qk_dim,
                                    v_dim=config.v_dim, eps=eps)
        elif config.kind is PartKind.MLP:
            module = mlp_part(embed_dim=config.embed_dim, mlp_dim=config.mlp_dim, eps=eps)
        elif config.kind in (PartKind.BLOCK, PartKind.ATTN_BLOCK, PartKind.MLP_BLOCK):
            spec = BlockSpec(heads=config.heads, qk_dim=config.qk_dim, v_dim=config.v_dim,
                             mlp_dim=config.mlp_dim)
            scale = config.qk_dim**-0.5 if spec.has_attn else 1.0
            module = vit.Block(embed_dim=config.embed_dim, spec=spec, scale=scale, eps=eps)
        else:
            module = vit.VisionTransformer(fixed_parts_spec(base, config.embed_dim))
            module.blocks = torch.nn.ModuleList()
    module.nvit_config = config
    return module.eval()


def part_input_shape(config: PartConfig, base: ArchSpec, batch_size: int) -> tuple[int, ...]:
    if config.kind is PartKind.FIXED:
        return image_shape(base, batch_size)
    return (batch_size, base.num_tokens, config.embed_dim)


def image_shape(spec: ArchSpec, batch_size: int) -> tuple[int, int, int, int]:
    return (batch_size, spec.in_chans, spec.img_size, spec.img_size)


def part_workload(config: PartConfig, base: ArchSpec, batch_size: int) -> Workload:
    """What the backend times for one LUT row."""
    return Workload(name=config.key, module=build_part_module(config, base),
                    input_shape=part_input_shape(config, base, batch_size))


def model_workload(spec: ArchSpec, batch_size: int, *, name: str | None = None) -> Workload:
    """A whole model (for calibration and end-to-end checks); the module carries ``spec`` as usual. A Swin is
    built by :func:`~nvit.profiler.swin_workloads.swin_model_workload`."""
    from nvit.swin import SwinSpec

    if isinstance(spec, SwinSpec):
        from nvit.profiler.swin_workloads import swin_model_workload

        return swin_model_workload(spec, batch_size, name=name)
    torch, vit, _, _ = _modules()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        module = vit.VisionTransformer(spec).eval()
    return Workload(name=name or f"model:{spec.name or 'custom'}", module=module,
                    input_shape=image_shape(spec, batch_size))
