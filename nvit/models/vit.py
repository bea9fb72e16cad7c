"""A Vision Transformer built from an :class:`~nvit.arch.ArchSpec`, with optional pruning gates.

Sub-module names follow timm's ViT/DeiT (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``mlp.fc1``...), so
checkpoints map onto it key by key. The fused ``qkv`` layer has explicit split sizes
``[heads*qk_dim, heads*qk_dim, heads*v_dim]`` (head-major inside each part), so Q/K and V widths may differ.

Gates (created by :meth:`VisionTransformer.enable_gates`) multiply one unit of each prunable group:
heads, QK channels, V channels and MLP neurons per block, each whole sub-layer's residual branch, and
embedding channels globally. A gate of zero
is exactly equivalent to removing the unit (LayerNorm statistics are taken over live embedding channels
only), which is what lets :func:`nvit.models.slicing.slice_model` be checked against a masked model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvit.arch import ArchSpec, BlockSpec


class PatchEmbed(nn.Module):
    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def masked_layer_norm(
    x: torch.Tensor, norm: nn.LayerNorm, emb_gate: torch.Tensor | None
) -> torch.Tensor:
    """LayerNorm whose statistics count only live embedding channels (weighted by ``emb_gate``)."""
    if emb_gate is None:
        return norm(x)
    live = emb_gate.sum()
    mean = (x * emb_gate).sum(-1, keepdim=True) / live
    centred = (x - mean) * emb_gate
    var = (centred * centred).sum(-1, keepdim=True) / live
    return centred * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias * emb_gate


def gated_branch(out: torch.Tensor, branch_gate: torch.Tensor | None, emb_gate: torch.Tensor | None) -> torch.Tensor:
    """A residual branch's output times its branch gate and the live embedding channels (dead ones stay 0)."""
    if branch_gate is not None:
        out = out * branch_gate
    return out if emb_gate is None else out * emb_gate


class HeadAttention(nn.Module):
    """What every attention here shares: a fused ``qkv`` with per-part widths, the output projection, and the
    head, QK-channel and V-channel gates; subclasses say which tokens attend to which."""

    def __init__(self, *, embed_dim: int, heads: int, qk_dim: int, v_dim: int, scale: float) -> None:
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.scale = heads, qk_dim, v_dim, scale
        self.split_sizes = (heads * qk_dim, heads * qk_dim, heads * v_dim)
        self.qkv = nn.Linear(embed_dim, sum(self.split_sizes))
        self.proj = nn.Linear(heads * v_dim, embed_dim)
        self.head_gate: nn.Parameter | None = None
        self.qk_gate: nn.Parameter | None = None
        self.v_gate: nn.Parameter | None = None

    def heads_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, n, C)`` → gated Q, K, V as ``(b, heads, n, width)``."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.reshape(b, n, self.heads, self.qk_dim).transpose(1, 2)
        k = k.reshape(b, n, self.heads, self.qk_dim).transpose(1, 2)
        v = v.reshape(b, n, self.heads, self.v_dim).transpose(1, 2)
        if self.qk_gate is not None:
            q = q * self.qk_gate
        if self.v_gate is not None:
            v = v * self.v_gate
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """``(b, heads, n, v_dim)`` → gated heads, concatenated and projected: ``(b, n, C)``."""
        b, _, n, _ = out.shape
        if self.head_gate is not None:
            out = out * self.head_gate.view(1, -1, 1, 1)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))


class Attention(HeadAttention):
    """Every token attends to every token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_of(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, scale=self.scale))


class Mlp(nn.Module):
    def __init__(self, *, embed_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, embed_dim)
        self.gate: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        if self.gate is not None:
            hidden = hidden * self.gate
        return self.fc2(hidden)


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``+ mlp(norm2(x))``; either sub-layer may be absent (``attn``/``mlp`` is
    ``None`` and so is its norm), as :class:`~nvit.arch.BlockSpec` allows.

    With gates enabled each present sub-layer also has a one-unit gate on its residual branch
    (``attn_gate``, ``mlp_gate``): at 0 the block computes exactly what it computes without that sub-layer,
    and its gradient is the Hessian-aware estimate of removing the whole sub-layer.
    """

    def __init__(self, *, embed_dim: int, spec: BlockSpec, scale: float, eps: float) -> None:
        super().__init__()
        self.spec = spec
        self.norm1 = nn.LayerNorm(embed_dim, eps=eps) if spec.has_attn else None
        self.attn = Attention(
            embed_dim=embed_dim, heads=spec.heads, qk_dim=spec.qk_dim, v_dim=spec.v_dim, scale=scale
        ) if spec.has_attn else None
        self.norm2 = nn.LayerNorm(embed_dim, eps=eps) if spec.has_mlp else None
        self.mlp = Mlp(embed_dim=embed_dim, mlp_dim=spec.mlp_dim) if spec.has_mlp else None
        self.attn_gate: nn.Parameter | None = None
        self.mlp_gate: nn.Parameter | None = None

    def forward(self, x: torch.Tensor, emb_gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn is not None:
            x = x + gated_branch(self.attn(masked_layer_norm(x, self.norm1, emb_gate)), self.attn_gate, emb_gate)
        if self.mlp is not None:
            x = x + gated_branch(self.mlp(masked_layer_norm(x, self.norm2, emb_gate)), self.mlp_gate, emb_gate)
        return x


def enable_block_gates(block: nn.Module, ones: Any) -> None:
    """All-ones unit gates (heads, QK, V, MLP neurons) and branch gates for a block's present sub-layers."""
    if block.attn is not None:
        a = block.attn
        a.head_gate, a.qk_gate, a.v_gate = ones(a.heads), ones(a.qk_dim), ones(a.v_dim)
        block.attn_gate = ones(1)
    if block.mlp is not None:
        block.mlp.gate = ones(block.mlp.fc1.out_features)
        block.mlp_gate = ones(1)


def disable_block_gates(block: nn.Module) -> None:
    if block.attn is not None:
        block.attn.head_gate = block.attn.qk_gate = block.attn.v_gate = None
    if block.mlp is not None:
        block.mlp.gate = None
    block.attn_gate = block.mlp_gate = None


def block_gates(block: nn.Module) -> list[nn.Parameter | None]:
    """A block's gates in layout order: ``head``, ``qk``, ``v`` (with attention), ``mlp`` (with an MLP), then
    the attention and the MLP branch gate."""
    a, m = block.attn, block.mlp
    gates = [a.head_gate, a.qk_gate, a.v_gate] if a is not None else []
    gates += [m.gate] if m is not None else []
    gates += [block.attn_gate] if a is not None else []
    gates += [block.mlp_gate] if m is not None else []
    return gates


class GatedModel(nn.Module):
    """A model with pruning gates: ``gate_parameters`` lists them (subclasses), the rest are its weights."""

    def gate_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def weight_parameters(self) -> list[nn.Parameter]:
        gate_ids = {id(g) for g in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gate_ids]


class VisionTransformer(GatedModel):
    """ViT/DeiT with per-block widths. ``forward`` returns logits (averaged heads when distilled, in eval)."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        e = spec.embed_dim
        self.patch_embed = PatchEmbed(
            img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, embed_dim=e
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, e)) if spec.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_tokens, e))
        self.blocks = nn.ModuleList(
            Block(embed_dim=e, spec=b, scale=spec.block_scale(i), eps=spec.layer_norm_eps)
            for i, b in enumerate(spec.blocks)
        )
        self.norm = nn.LayerNorm(e, eps=spec.layer_norm_eps)
        self.head = nn.Linear(e, spec.num_classes)
        self.head_dist = nn.Linear(e, spec.num_classes) if spec.distilled else None
        self.emb_gate: nn.Parameter | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-like init: truncated normal (std 0.02) for weights and tokens, zero biases, unit norms."""
        for t in (self.cls_token, self.dist_token, self.pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- gates ---------------------------------------------------------------------------------
    def enable_gates(self) -> None:
        """Create all-ones gates for every prunable group (parameters, so they receive gradients)."""
        p = next(self.parameters())
        ones = lambda n: nn.Parameter(torch.ones(n, device=p.device, dtype=p.dtype))  # noqa: E731
        self.emb_gate = ones(self.spec.embed_dim)
        for block in self.blocks:
            enable_block_gates(block, ones)

    def disable_gates(self) -> None:
        self.emb_gate = None
        for block in self.blocks:
            disable_block_gates(block)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates in the pruning layout's order: ``emb``, then per block ``head``, ``qk``, ``v`` (with
        attention), ``mlp`` (with an MLP), the attention branch and the MLP branch gate."""
        gates = [self.emb_gate]
        for block in self.blocks:
            gates += block_gates(block)
        return [g for g in gates if g is not None]

    # ---- forward -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        gate = self.emb_gate
        if gate is not None:
            x = x * gate
        for block in self.blocks:
            x = block(x, gate)
        return masked_layer_norm(x, self.norm, gate)

    def forward_heads(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(x[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(self.forward_features(x))


def build_model(spec: ArchSpec, *, seed: int | None = None) -> VisionTransformer:
    """Build a randomly initialised model; ``seed`` makes the initialisation reproducible."""
    if seed is None:
        return VisionTransformer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(spec)
