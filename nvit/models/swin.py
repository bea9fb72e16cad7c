"""A Swin Transformer built from a :class:`~nvit.swin.SwinSpec` (per-block widths, one width per stage).

Sub-module names follow timm's current Swin (``patch_embed.proj``/``norm``, ``layers.S.downsample`` before
every stage but the first, ``layers.S.blocks.B.attn.qkv``/``proj``/``relative_position_bias_table``,
``mlp.fc1``, ``norm``; the head is ``head`` as in timm's older Swin and its ViT), so checkpoints map onto it key
by key (:mod:`nvit.models.swin_checkpoint`).
Tokens travel as ``(batch, H, W, channels)``; window attention uses a fused ``qkv`` with explicit split sizes
``[heads*qk_dim, heads*qk_dim, heads*v_dim]`` (head-major within each part, as timm's layout for equal widths),
so Q/K and V widths may differ.
"""

from __future__ import annotations

import torch
from torch import nn

from nvit.arch import BlockSpec
from nvit.models.vit import (
    GatedModel,
    HeadAttention,
    Mlp,
    block_gates,
    disable_block_gates,
    enable_block_gates,
    gated_branch,
    masked_layer_norm,
)
from nvit.swin import SwinSpec

#: What the shift mask adds between tokens of different image regions (softmax weight ~e⁻¹⁰⁰, as the paper).
MASK_VALUE = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """``(W², W²)`` indices into a ``(2W−1)²``-row bias table: the row of the offset between two tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (W², W², 2), from 0
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·windows, window², C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`to_windows`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """``(windows, W², W²)``: 0 between tokens of the same image region after the cyclic shift, else
    :data:`MASK_VALUE` (the regions the roll brought together are not neighbours)."""
    region = torch.zeros(resolution, resolution)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            region[rows, cols] = label
            label += 1
    labels = to_windows(region[None, :, :, None], window).squeeze(-1)  # (windows, W²)
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, MASK_VALUE)


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor, emb_gate: torch.Tensor | None = None) -> torch.Tensor:
        return masked_layer_norm(self.proj(x).permute(0, 2, 3, 1), self.norm, emb_gate)  # (B, H, W, C)


class WindowAttention(HeadAttention):
    """Tokens attend within their window, with a relative-position bias per head (and the shift's mask)."""

    def __init__(self, *, embed_dim: int, heads: int, qk_dim: int, v_dim: int, window: int, scale: float) -> None:
        super().__init__(embed_dim=embed_dim, heads=heads, qk_dim=qk_dim, v_dim=v_dim, scale=scale)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """``(heads, W², W²)``."""
        area = self.window**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(area, area, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, _ = x.shape  # (batch·windows, W², C)
        q, k, v = self.heads_of(x)
        scores = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias()  # (bw, heads, n, n)
        if mask is not None:
            windows = mask.shape[0]
            scores = (scores.view(-1, windows, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        return self.merge(scores.softmax(dim=-1) @ v)


class SwinBlock(nn.Module):
    """``x + attn(norm1(x))`` over (shifted) windows, then ``+ mlp(norm2(x))``; either sub-layer may be absent."""

    def __init__(self, *, embed_dim: int, spec: BlockSpec, resolution: int, window: int, shift: int,
                 scale: float, eps: float) -> None:
        super().__init__()
        self.spec, self.window, self.shift = spec, window, shift
        self.norm1 = nn.LayerNorm(embed_dim, eps=eps) if spec.has_attn else None
        self.attn = WindowAttention(embed_dim=embed_dim, heads=spec.heads, qk_dim=spec.qk_dim, v_dim=spec.v_dim,
                                    window=window, scale=scale) if spec.has_attn else None
        self.norm2 = nn.LayerNorm(embed_dim, eps=eps) if spec.has_mlp else None
        self.mlp = Mlp(embed_dim=embed_dim, mlp_dim=spec.mlp_dim) if spec.has_mlp else None
        mask = shift_mask(resolution, window, shift) if shift and spec.has_attn else None
        self.register_buffer("attn_mask", mask, persistent=False)
        self.attn_gate: nn.Parameter | None = None
        self.mlp_gate: nn.Parameter | None = None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        out = from_windows(self.attn(to_windows(x, self.window), self.attn_mask), self.window, h, w)
        return torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2)) if self.shift else out

    def forward(self, x: torch.Tensor, emb_gate: torch.Tensor | None = None) -> torch.Tensor:  # (B, H, W, C)
        if self.attn is not None:
            x = x + gated_branch(self._attention(masked_layer_norm(x, self.norm1, emb_gate)), self.attn_gate, emb_gate)
        if self.mlp is not None:
            x = x + gated_branch(self.mlp(masked_layer_norm(x, self.norm2, emb_gate)), self.mlp_gate, emb_gate)
        return x


class PatchMerging(nn.Module):
    """Each 2×2 neighbourhood's channels concatenated (top-left, bottom-left, top-right, bottom-right),
    normalised, and projected to the next stage's width without bias."""

    def __init__(self, *, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim, eps=eps)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, in_gate: torch.Tensor | None = None,
                out_gate: torch.Tensor | None = None) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = self.reduction(masked_layer_norm(x, self.norm, None if in_gate is None else in_gate.repeat(4)))
        return x if out_gate is None else x * out_gate


class SwinStageModule(nn.Module):
    def __init__(self, spec: SwinSpec, index: int) -> None:
        super().__init__()
        stage, eps = spec.stages[index], spec.layer_norm_eps
        self.downsample = (PatchMerging(in_dim=spec.stages[index - 1].embed_dim, out_dim=stage.embed_dim, eps=eps)
                           if index else None)
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dim=stage.embed_dim, spec=b, resolution=spec.resolution(index), window=spec.window(index),
                      shift=spec.shift(index, j), scale=spec.block_scale(b), eps=eps)
            for j, b in enumerate(stage.blocks))
        self.emb_gate: nn.Parameter | None = None  # the stage's embedding channels

    def forward(self, x: torch.Tensor, in_gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x, in_gate, self.emb_gate)
        for block in self.blocks:
            x = block(x, self.emb_gate)
        return x


class SwinTransformer(GatedModel):
    """Swin with per-block widths. ``forward`` returns logits."""

    def __init__(self, spec: SwinSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(patch_size=spec.patch_size, in_chans=spec.in_chans,
                                      embed_dim=spec.stages[0].embed_dim, eps=spec.layer_norm_eps)
        self.layers = nn.ModuleList(SwinStageModule(spec, i) for i in range(spec.num_stages))
        self.norm = nn.LayerNorm(spec.stages[-1].embed_dim, eps=spec.layer_norm_eps)
        self.head = nn.Linear(spec.stages[-1].embed_dim, spec.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-like init: truncated normal (std 0.02) for weights and bias tables, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    # ---- gates ---------------------------------------------------------------------------------
    def enable_gates(self) -> None:
        """All-ones gates for every prunable group: each stage's embedding channels, and per block its heads,
        QK and V channels, MLP neurons and the two sub-layer branches (parameters, so they get gradients)."""
        p = next(self.parameters())
        ones = lambda n: nn.Parameter(torch.ones(n, device=p.device, dtype=p.dtype))  # noqa: E731
        for layer, stage in zip(self.layers, self.spec.stages, strict=True):
            layer.emb_gate = ones(stage.embed_dim)
            for block in layer.blocks:
                enable_block_gates(block, ones)

    def disable_gates(self) -> None:
        for layer in self.layers:
            layer.emb_gate = None
            for block in layer.blocks:
                disable_block_gates(block)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates in order: per stage its embedding gate, then each block's
        (:func:`~nvit.models.vit.block_gates`)."""
        gates: list[nn.Parameter | None] = []
        for layer in self.layers:
            gates.append(layer.emb_gate)
            for block in layer.blocks:
                gates += block_gates(block)
        return [g for g in gates if g is not None]

    # ---- forward -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x, self.layers[0].emb_gate)
        gate = None
        for layer in self.layers:
            x = layer(x, gate)
            gate = layer.emb_gate
        return masked_layer_norm(x, self.norm, gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(1, 2)))  # global average pool, then the head


def build_swin(spec: SwinSpec, *, seed: int | None = None) -> SwinTransformer:
    """A randomly initialised Swin; ``seed`` makes the initialisation reproducible."""
    if seed is None:
        return SwinTransformer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinTransformer(spec)
