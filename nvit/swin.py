"""Swin Transformer architectures: stages of blocks with (shifted) window attention, patch merging between them.

A :class:`SwinSpec` is a patch embedding (``patch_size``, then a LayerNorm), stages of blocks at halving
resolutions and their own embedding width, a patch-merging layer before every stage but the first (the 2×2
neighbourhood's channels concatenated, normalised, and projected to the next stage's width, without bias),
a final norm, global average pooling and a linear head. Every block is a :class:`~nvit.arch.BlockSpec`
(heads, per-head QK and V widths, MLP width; either sub-layer may be absent), so a pruned Swin has per-block
widths like a pruned ViT, and one embedding width per stage.

Window attention follows the paper: tokens attend within non-overlapping ``W×W`` windows, with a learned
relative-position bias per head (a ``(2W−1)²``-row table); odd blocks of a stage shift the windows by ``W/2``
(a cyclic roll, with a mask keeping tokens from attending across the image's wrapped edges). A stage whose
resolution is at most ``W`` takes one window of the whole resolution and never shifts (as timm does).

Costs count what the model computes per image: the projections, ``QKᵀ`` and ``AV`` within windows, the
MLPs, the merging projections, the patch projection and the head (norms, softmax, GELU, biases, the bias
gather and the pooling excluded), checked against a traced count in the tests.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec, BlockSpec, block_flops, block_params, read_arch_doc
from nvit.errors import SpecError
from nvit.presets import resolve_arch

SWIN_KIND = "swin"


@dataclass(frozen=True)
class SwinStage:
    """One stage: its embedding width and its blocks (window attention alternating with shifted windows)."""

    embed_dim: int
    blocks: tuple[BlockSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(b if isinstance(b, BlockSpec) else BlockSpec(**b)
                                                 for b in self.blocks))
        if not isinstance(self.embed_dim, int) or isinstance(self.embed_dim, bool) or self.embed_dim < 1:
            raise SpecError(f"a stage's embed_dim must be a positive integer, got {self.embed_dim!r}")
        if not self.blocks:
            raise SpecError("a stage needs at least one block")

    @property
    def depth(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class SwinSpec:
    """A Swin Transformer (module doc). Resolutions halve from stage to stage, starting at ``img/patch``."""

    stages: tuple[SwinStage, ...]
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    window_size: int = 7
    layer_norm_eps: float = 1e-5
    name: str = ""
    qk_scale: float | None = None  # attention scale of every block; None: each block's qk_dim ** -0.5
    kind: str = field(default=SWIN_KIND, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(s if isinstance(s, SwinStage) else SwinStage(**s)
                                                 for s in self.stages))
        for key in ("img_size", "patch_size", "in_chans", "num_classes", "window_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"Swin spec: {key} must be a positive integer, got {value!r}")
        if not self.stages:
            raise SpecError("Swin spec: at least one stage is needed")
        if self.img_size % self.patch_size:
            raise SpecError(f"Swin spec: image {self.img_size} is not a multiple of the patch size {self.patch_size}")
        for i in range(self.num_stages):
            res = self.resolution(i)
            if i + 1 < self.num_stages and res % 2:
                raise SpecError(f"Swin spec: stage {i} has an odd resolution {res}; patch merging needs an even one")
            if res > self.window_size and res % self.window_size:
                raise SpecError(f"Swin spec: stage {i}'s resolution {res} is not a multiple of the window "
                                f"{self.window_size}")

    # ---- geometry ----------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.stages)

    def resolution(self, stage: int) -> int:
        """Tokens per side in ``stage``."""
        return self.img_size // self.patch_size // 2**stage

    def num_tokens(self, stage: int) -> int:
        return self.resolution(stage) ** 2

    def window(self, stage: int) -> int:
        """The window side in ``stage``: ``window_size``, or the whole resolution when it is not larger."""
        return min(self.window_size, self.resolution(stage))

    def shift(self, stage: int, block: int) -> int:
        """The cyclic shift of block ``block`` of ``stage`` (odd blocks, where the stage has several windows)."""
        return self.window_size // 2 if block % 2 and self.resolution(stage) > self.window_size else 0

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Every block, stage by stage (numbered across stages, as pruning numbers them)."""
        return tuple(b for s in self.stages for b in s.blocks)

    @property
    def removed_sublayers(self) -> dict[str, int]:
        """How many blocks lack their attention / their MLP."""
        return {"attn": sum(not b.has_attn for b in self.blocks), "mlp": sum(not b.has_mlp for b in self.blocks)}

    def with_widths(self, embeds: Sequence[int], blocks: Sequence[Sequence[BlockSpec]]) -> SwinSpec:
        """This Swin at other widths (an embedding and the blocks per stage), its attention scale kept as slicing
        keeps it: ``qk_scale``, else the one default scale its blocks share (refused when they differ)."""
        stages = tuple(SwinStage(int(e), tuple(bs)) for e, bs in zip(embeds, blocks, strict=True))
        return dataclasses.replace(self, stages=stages, qk_scale=self.shared_scale())

    def shared_scale(self) -> float | None:
        """The attention scale a narrower copy must keep to compute what this Swin computes: ``qk_scale``, else
        the one default scale its blocks share (``None`` without attention; refused when they differ)."""
        if self.qk_scale is not None:
            return self.qk_scale
        scales = {self.block_scale(b) for b in self.blocks if b.has_attn}
        if len(scales) > 1:
            raise SpecError("the Swin's blocks have different default attention scales; set qk_scale to slice or "
                            "prune their QK channels")
        return scales.pop() if scales else None

    def block_scale(self, block: BlockSpec) -> float:
        """The attention scale of ``block``: ``qk_scale``, else ``qk_dim ** -0.5`` (a sliced model keeps its
        parent's scale, as QK channels go)."""
        if self.qk_scale is not None:
            return self.qk_scale
        return block.qk_dim**-0.5 if block.qk_dim else 1.0  # a block without attention has no scale to keep

    # ---- costs ---------------------------------------------------------------------------------------
    def block_params(self, stage: int, block: BlockSpec) -> int:
        """A block's parameters: the ViT block's, plus the relative-position bias table of its heads."""
        w = self.window(stage)
        table = (2 * w - 1) ** 2 * block.heads if block.has_attn else 0
        return block_params(self.stages[stage].embed_dim, block) + table

    def merge_params(self, stage: int) -> int:
        """The patch merging before ``stage`` (stage ≥ 1): a LayerNorm over 4×E_in and the bias-free projection."""
        e_in, e_out = self.stages[stage - 1].embed_dim, self.stages[stage].embed_dim
        return 2 * 4 * e_in + 4 * e_in * e_out

    def num_params(self) -> int:
        """Exact number of parameters of the model built from this spec (equals ``sum(p.numel())``)."""
        e0, last = self.stages[0].embed_dim, self.stages[-1].embed_dim
        total = e0 * self.in_chans * self.patch_size**2 + e0 + 2 * e0  # patch projection and its norm
        for i, stage in enumerate(self.stages):
            total += self.merge_params(i) if i else 0
            total += sum(self.block_params(i, b) for b in stage.blocks)
        return total + 2 * last + last * self.num_classes + self.num_classes

    def block_flops(self, stage: int, block: BlockSpec) -> int:
        """FLOPs of one block for one image (2 per multiply-add): a ViT block's whose tokens attend within their
        window."""
        return block_flops(self.stages[stage].embed_dim, block, self.num_tokens(stage),
                           attended=self.window(stage) ** 2)

    def flops(self) -> int:
        """Matmul/conv FLOPs for one image (2 per multiply-add)."""
        total = 2 * self.num_tokens(0) * self.stages[0].embed_dim * self.in_chans * self.patch_size**2
        for i, stage in enumerate(self.stages):
            if i:
                total += 2 * self.num_tokens(i) * 4 * self.stages[i - 1].embed_dim * stage.embed_dim
            total += sum(self.block_flops(i, b) for b in stage.blocks)
        return total + 2 * self.stages[-1].embed_dim * self.num_classes

    def macs(self) -> int:
        """Multiply-adds for one image (what timm and the papers call "FLOPs")."""
        return self.flops() // 2

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stages"}
        data["stages"] = [{"embed_dim": s.embed_dim,
                           "blocks": [{f.name: getattr(b, f.name) for f in fields(BlockSpec)} for b in s.blocks]}
                          for s in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwinSpec:
        if not isinstance(data, Mapping):
            raise SpecError("a Swin spec must be a JSON object")
        if data.get("kind", SWIN_KIND) != SWIN_KIND:
            raise SpecError(f"not a Swin spec (kind {data.get('kind')!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown Swin spec key(s): {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "kind"})
        except TypeError as exc:
            raise SpecError(f"Swin spec: {exc}") from None


# ---- presets ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SwinPreset:
    embed_dim: int  # of the first stage; each later stage doubles it
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    head_dim: int = 32
    mlp_ratio: int = 4


#: The published Swin-T/S/B (224 px, patch 4, window 7) and the small ones the tests and benchmarks train.
_PRESETS = {
    "swin_tiny": _SwinPreset(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_small": _SwinPreset(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_base": _SwinPreset(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    # digits (8 px, patch 1, window 4: 8² tokens in four shifting windows, then 4² in one)
    "swin_test": _SwinPreset(32, (2, 2), (2, 4), head_dim=16, extra={
        "img_size": 8, "patch_size": 1, "in_chans": 1, "num_classes": 10, "window_size": 4}),
    # Fashion-MNIST (28 px, patch 2, window 7: 14² tokens in four shifting windows, then 7² in one)
    "swin_fashion": _SwinPreset(32, (2, 2), (2, 4), head_dim=16, extra={
        "img_size": 28, "patch_size": 2, "in_chans": 1, "num_classes": 10, "window_size": 7}),
}


def swin_preset_names() -> list[str]:
    return list(_PRESETS)


def swin_preset(name: str, **overrides: Any) -> SwinSpec:
    """A Swin architecture by name (:func:`swin_preset_names`)."""
    p = _PRESETS.get(name)
    if p is None:
        raise SpecError(f"unknown Swin preset {name!r}; known: {', '.join(_PRESETS)}")
    stages = []
    for i, (depth, heads) in enumerate(zip(p.depths, p.heads, strict=True)):
        e = p.embed_dim * 2**i
        stages.append(SwinStage(e, (BlockSpec(heads=heads, qk_dim=p.head_dim, v_dim=p.head_dim,
                                              mlp_dim=e * p.mlp_ratio),) * depth))
    return SwinSpec(stages=tuple(stages), name=name, **{**p.extra, **overrides})


# ---- one name or file, either kind ---------------------------------------------------------------------
def spec_from_dict(data: Any) -> ArchSpec | SwinSpec:
    """A spec object as stored in ``arch.json``: a Swin when its ``kind`` says so, else a ViT."""
    if isinstance(data, Mapping) and data.get("kind") == SWIN_KIND:
        return SwinSpec.from_dict(data)
    return ArchSpec.from_dict(data)


def load_any_arch_file(path: str | os.PathLike[str]) -> tuple[ArchSpec | SwinSpec, dict[str, Any]]:
    """An ``arch.json`` of either kind, and its provenance."""
    data, provenance = read_arch_doc(path)
    try:
        return spec_from_dict(data), provenance
    except (SpecError, TypeError) as exc:
        raise SpecError(f"{path}: {exc}") from None


def resolve_any_arch(name_or_path: str) -> ArchSpec | SwinSpec:
    """A preset name (ViT/DeiT/ReViT or Swin) or an ``arch.json`` of either kind."""
    if name_or_path in _PRESETS:
        return swin_preset(name_or_path)
    if name_or_path.endswith(".json") or os.path.sep in name_or_path or Path(name_or_path).exists():
        return load_any_arch_file(name_or_path)[0]
    return resolve_arch(name_or_path)


#: What a Swin can go through today, for the commands that refuse it.
SWIN_SUPPORT = ("nvit arch, train, profile (a .swinlut table), prune, finetune, export and compare handle Swin; "
                "parameter redistribution is not built for it yet")


def require_vit(spec: Any, command: str) -> None:
    """Refuse a Swin in a command that handles ViTs only, in one line."""
    if isinstance(spec, SwinSpec):
        raise SpecError(f"{command} does not handle a Swin yet ({spec.name or 'a Swin'}): {SWIN_SUPPORT}")
