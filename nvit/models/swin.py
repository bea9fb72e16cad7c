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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H, W, C)


class WindowAttention(nn.Module):
    def __init__(self, *, embed_dim: int, heads: int, qk_dim: int, v_dim: int, window: int) -> None:
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.window = heads, qk_dim, v_dim, window
        self.scale = qk_dim**-0.5
        self.split_sizes = (heads * qk_dim, heads * qk_dim, heads * v_dim)
        self.qkv = nn.Linear(embed_dim, sum(self.split_sizes))
        self.proj = nn.Linear(heads * v_dim, embed_dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """``(heads, W², W²)``."""
        area = self.window**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(area, area, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, _ = x.shape  # (batch·windows, W², C)
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.reshape(bw, n, self.heads, self.qk_dim).transpose(1, 2)
        k = k.reshape(bw, n, self.heads, self.qk_dim).transpose(1, 2)
        v = v.reshape(bw, n, self.heads, self.v_dim).transpose(1, 2)
        scores = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias()  # (bw, heads, n, n)
        if mask is not None:
            windows = mask.shape[0]
            scores = (scores.view(-1, windows, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        out = scores.softmax(dim=-1) @ v  # (bw, heads, n, v_dim)
        return self.proj(out.transpose(1, 2).reshape(bw, n, self.heads * self.v_dim))


class Mlp(nn.Module):
    def __init__(self, *, embed_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """``x + attn(norm1(x))`` over (shifted) windows, then ``+ mlp(norm2(x))``; either sub-layer may be absent."""

    def __init__(self, *, embed_dim: int, spec: BlockSpec, resolution: int, window: int, shift: int,
                 eps: float) -> None:
        super().__init__()
        self.spec, self.window, self.shift = spec, window, shift
        self.norm1 = nn.LayerNorm(embed_dim, eps=eps) if spec.has_attn else None
        self.attn = WindowAttention(embed_dim=embed_dim, heads=spec.heads, qk_dim=spec.qk_dim, v_dim=spec.v_dim,
                                    window=window) if spec.has_attn else None
        self.norm2 = nn.LayerNorm(embed_dim, eps=eps) if spec.has_mlp else None
        self.mlp = Mlp(embed_dim=embed_dim, mlp_dim=spec.mlp_dim) if spec.has_mlp else None
        mask = shift_mask(resolution, window, shift) if shift and spec.has_attn else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        out = from_windows(self.attn(to_windows(x, self.window), self.attn_mask), self.window, h, w)
        return torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2)) if self.shift else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if self.attn is not None:
            x = x + self._attention(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class PatchMerging(nn.Module):
    """Each 2×2 neighbourhood's channels concatenated (top-left, bottom-left, top-right, bottom-right),
    normalised, and projected to the next stage's width without bias."""

    def __init__(self, *, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim, eps=eps)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStageModule(nn.Module):
    def __init__(self, spec: SwinSpec, index: int) -> None:
        super().__init__()
        stage, eps = spec.stages[index], spec.layer_norm_eps
        self.downsample = (PatchMerging(in_dim=spec.stages[index - 1].embed_dim, out_dim=stage.embed_dim, eps=eps)
                           if index else None)
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dim=stage.embed_dim, spec=b, resolution=spec.resolution(index), window=spec.window(index),
                      shift=spec.shift(index, j), eps=eps) for j, b in enumerate(stage.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SwinTransformer(nn.Module):
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(1, 2)))  # global average pool, then the head


def build_swin(spec: SwinSpec, *, seed: int | None = None) -> SwinTransformer:
    """A randomly initialised Swin; ``seed`` makes the initialisation reproducible."""
    if seed is None:
        return SwinTransformer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinTransformer(spec)
