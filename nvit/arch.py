"""Architecture specs: a ViT whose blocks each have their own widths, their params and FLOPs, and ``arch.json``.

An :class:`ArchSpec` is the one language every part of nvit speaks: the model is built from it, the LUT
predicts its latency, pruning produces a new one, and ``arch.json`` stores it with a schema version. Named
architectures (DeiT, NViT's ReViT) are in :mod:`nvit.presets`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from nvit.errors import SpecError
from nvit.fileio import atomic_write_text

ARCH_SCHEMA_VERSION = 2  # 2: a block's attention or MLP may be absent (width 0)
READABLE_ARCH_VERSIONS = (1, 2)
ARCH_FILE_KIND = "nvit.arch"


@dataclass(frozen=True)
class BlockSpec:
    """Widths of one transformer block: ``heads`` heads of ``qk_dim``/``v_dim`` channels and an MLP.

    A block may lack one of its two sub-layers: ``heads = qk_dim = v_dim = 0`` means the attention (with its
    LayerNorm and residual add) is absent, ``mlp_dim = 0`` that the MLP is. A block with neither is not a
    block: the architecture simply has one block fewer.
    """

    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpecError(f"block {f.name} must be a non-negative integer, got {value!r}")
        attn = (self.heads, self.qk_dim, self.v_dim)
        if 0 in attn and any(attn):
            raise SpecError(f"block heads, qk_dim and v_dim must all be positive (attention) or all 0 (no "
                            f"attention), got {self.heads}, {self.qk_dim}, {self.v_dim}")
        if not self.has_attn and not self.has_mlp:
            raise SpecError("a block needs an attention or an MLP (drop the block instead)")

    @property
    def has_attn(self) -> bool:
        return self.heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.mlp_dim > 0

    def without_attn(self) -> BlockSpec | None:
        """This block with its attention removed (``None``: nothing would be left)."""
        return BlockSpec(0, 0, 0, self.mlp_dim) if self.has_mlp else None

    def without_mlp(self) -> BlockSpec | None:
        """This block with its MLP removed (``None``: nothing would be left)."""
        return BlockSpec(self.heads, self.qk_dim, self.v_dim, 0) if self.has_attn else None

    def describe(self) -> str:
        """``h4 q16 v16 m256``, with ``attn removed`` / ``mlp removed`` for an absent sub-layer."""
        attn = f"h{self.heads} q{self.qk_dim} v{self.v_dim}" if self.has_attn else "attn removed"
        return f"{attn} " + (f"m{self.mlp_dim}" if self.has_mlp else "mlp removed")

    @property
    def qk_width(self) -> int:
        """Total Q (and K) width over all heads."""
        return self.heads * self.qk_dim

    @property
    def v_width(self) -> int:
        """Total V width over all heads (the input width of the attention projection)."""
        return self.heads * self.v_dim


@dataclass(frozen=True)
class ArchSpec:
    """A Vision Transformer with one global ``embed_dim`` and per-block widths.

    ``qk_scale`` fixes the attention scale; ``None`` means ``qk_dim ** -0.5`` per block. Pruned models keep
    the scale of the model they came from so that removing QK channels does not rescale the logits.
    """

    embed_dim: int
    blocks: tuple[BlockSpec, ...]
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    distilled: bool = False
    qk_scale: float | None = None
    name: str = ""
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for key in ("embed_dim", "img_size", "patch_size", "in_chans", "num_classes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(self.blocks, tuple):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if len(self.blocks) == 0:
            raise SpecError("an architecture needs at least one block")
        if not all(isinstance(b, BlockSpec) for b in self.blocks):
            raise SpecError("blocks must be BlockSpec instances")
        if self.img_size % self.patch_size:
            raise SpecError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.qk_scale is not None and not (isinstance(self.qk_scale, int | float) and self.qk_scale > 0):
            raise SpecError(f"qk_scale must be a positive number or null, got {self.qk_scale!r}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by every block (patches + class token + distillation token)."""
        return self.num_patches + self.num_prefix_tokens

    def block_scale(self, index: int) -> float:
        """The attention scale of block ``index`` (1.0 for a block without attention: never used)."""
        if self.qk_scale is not None:
            return self.qk_scale
        block = self.blocks[index]
        return block.qk_dim ** -0.5 if block.has_attn else 1.0

    def attention_scales(self) -> set[float]:
        """The default attention scales of the blocks that have attention."""
        return {self.block_scale(i) for i, b in enumerate(self.blocks) if b.has_attn}

    @property
    def removed_sublayers(self) -> dict[str, int]:
        """How many blocks lack their attention and their MLP."""
        return {"attn": sum(not b.has_attn for b in self.blocks), "mlp": sum(not b.has_mlp for b in self.blocks)}

    @property
    def is_uniform(self) -> bool:
        return len(set(self.blocks)) == 1

    def with_blocks(self, blocks: tuple[BlockSpec, ...], embed_dim: int | None = None, **changes: Any) -> ArchSpec:
        return replace(self, blocks=tuple(blocks), embed_dim=embed_dim or self.embed_dim, **changes)

    # ---- cost ----------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Exact number of parameters of the model built from this spec (equals ``sum(p.numel())``)."""
        e, c = self.embed_dim, self.num_classes
        total = e * self.in_chans * self.patch_size**2 + e  # patch projection
        total += self.num_prefix_tokens * e + self.num_tokens * e  # cls/dist tokens, position embedding
        total += sum(block_params(e, b) for b in self.blocks)
        total += 2 * e  # final norm
        total += (e * c + c) * (2 if self.distilled else 1)
        return total

    def block_flops(self, index: int) -> int:
        return block_flops(self.embed_dim, self.blocks[index], self.num_tokens)

    def flops(self) -> int:
        """Matmul/conv FLOPs for one image (2 per multiply-add); norms, softmax, GELU, biases excluded."""
        e = self.embed_dim
        total = 2 * self.num_patches * e * self.in_chans * self.patch_size**2
        total += sum(self.block_flops(i) for i in range(self.depth))
        total += 2 * e * self.num_classes * (2 if self.distilled else 1)
        return total

    def macs(self) -> int:
        """Multiply-adds for one image (what timm and the NViT paper call "FLOPs")."""
        return self.flops() // 2

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "blocks"}
        data["blocks"] = [{f.name: getattr(b, f.name) for f in fields(BlockSpec)} for b in self.blocks]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"an architecture must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown architecture key(s): {', '.join(unknown)}")
        missing = sorted({"embed_dim", "blocks"} - set(data))
        if missing:
            raise SpecError(f"architecture is missing key(s): {', '.join(missing)}")
        blocks_data = data["blocks"]
        if not isinstance(blocks_data, list):
            raise SpecError("'blocks' must be a list of block objects")
        block_keys = {f.name for f in fields(BlockSpec)}
        blocks = []
        for i, b in enumerate(blocks_data):
            if not isinstance(b, Mapping):
                raise SpecError(f"block {i} must be an object")
            if set(b) != block_keys:
                extra, lacking = sorted(set(b) - block_keys), sorted(block_keys - set(b))
                raise SpecError(f"block {i}: unknown keys {extra}, missing keys {lacking}")
            try:
                blocks.append(BlockSpec(**b))
            except SpecError as exc:
                raise SpecError(f"block {i}: {exc}") from None
        kwargs = {k: v for k, v in data.items() if k != "blocks"}
        return cls(blocks=tuple(blocks), **kwargs)


@dataclass(frozen=True)
class WidthSteps:
    """Channels per step of each width (field names as in :class:`BlockSpec` and :class:`ArchSpec`): what one
    pruning unit removes, so the latency table's finite differences (:meth:`nvit.lut.base.Predictor.delta_ms`),
    and the multiples a redesigned model's widths are rounded to (:mod:`nvit.redesign.learned`)."""

    heads: int = 1
    qk_dim: int = 8
    v_dim: int = 8
    mlp_dim: int = 8
    embed_dim: int = 8

    def __post_init__(self) -> None:
        for name, value in self.to_dict().items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"the {name} step must be a positive integer, got {value!r}")

    def step(self, width: str) -> int:
        """The step of ``width`` (a field name, or an enum whose value is one)."""
        return int(getattr(self, str(getattr(width, "value", width))))

    def round(self, width: str, value: float) -> int:
        """``value`` rounded to the nearest multiple of ``width``'s step (halves up), never below one step."""
        return round_to_step(value, self.step(width))

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def round_to_step(width: float, step: int) -> int:
    """Nearest multiple of ``step`` (halves up), at least ``step``."""
    if not math.isfinite(width):
        raise SpecError(f"cannot round a width of {width}")
    return max(step, step * math.floor(width / step + 0.5))


def block_params(embed_dim: int, block: BlockSpec) -> int:
    """Parameters of one block: per present sub-layer its LayerNorm, then fused QKV and projection, or the two
    MLP layers (with biases)."""
    e, h, q, v, m = embed_dim, block.heads, block.qk_dim, block.v_dim, block.mlp_dim
    qkv_out = h * (2 * q + v)
    attn = 2 * e + (e * qkv_out + qkv_out) + (h * v * e + e) if block.has_attn else 0
    mlp = 2 * e + (e * m + m) + (m * e + e) if block.has_mlp else 0
    return attn + mlp


def block_flops(embed_dim: int, block: BlockSpec, num_tokens: int, *, attended: int | None = None) -> int:
    """FLOPs of one block for one image of ``num_tokens`` tokens (DESIGN.md §2), each attending to ``attended``
    tokens (all of them by default; a Swin's window)."""
    n, e, h, q, v, m = num_tokens, embed_dim, block.heads, block.qk_dim, block.v_dim, block.mlp_dim
    a = n if attended is None else attended
    return 2 * n * e * h * (2 * q + v) + 2 * n * a * h * (q + v) + 2 * n * h * v * e + 4 * n * e * m


# ---- files ----------------------------------------------------------------------------------------
def save_arch(spec: Any, path: str | os.PathLike[str], provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``arch.json`` atomically: schema version, the spec (an :class:`ArchSpec` or another kind with
    ``to_dict``, ``num_params`` and ``flops``, e.g. a Swin), derived costs and provenance."""
    path = Path(path)
    summary = {"params": spec.num_params(), "flops": spec.flops()}
    if isinstance(spec, ArchSpec):
        summary["num_tokens"] = spec.num_tokens
    doc = {
        "schema_version": ARCH_SCHEMA_VERSION,
        "kind": ARCH_FILE_KIND,
        "arch": spec.to_dict(),
        "summary": summary,
        "provenance": dict(provenance or {}),
    }
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def read_arch_doc(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """The spec object of an ``arch.json`` (or of a bare spec file) and its provenance, checked as a file;
    which kind of spec it is, is the caller's to parse (:func:`load_arch_file` for a ViT)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"architecture file not found: {path}") from None
    except OSError as exc:
        raise SpecError(f"cannot read architecture file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path} must hold a JSON object")
    if "arch" not in doc:  # a bare spec, as a user may write by hand
        return doc, {}
    version = doc.get("schema_version")
    if version not in READABLE_ARCH_VERSIONS:
        raise SpecError(f"{path}: unsupported arch schema_version {version!r} (this nvit reads "
                        f"{', '.join(map(str, READABLE_ARCH_VERSIONS))})")
    unknown = sorted(set(doc) - {"schema_version", "kind", "arch", "summary", "provenance"})
    if unknown:
        raise SpecError(f"{path}: unknown top-level key(s): {', '.join(unknown)}")
    return doc["arch"], dict(doc.get("provenance") or {})


def load_arch_file(path: str | os.PathLike[str]) -> tuple[ArchSpec, dict[str, Any]]:
    """Read an ``arch.json`` (or a bare spec object); returns the spec and its provenance."""
    data, provenance = read_arch_doc(path)
    return _from_dict_in(data, Path(path)), provenance


def _from_dict_in(data: Any, path: Path) -> ArchSpec:
    try:
        return ArchSpec.from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise SpecError(f"{path}: {exc}") from None


def describe(spec: ArchSpec) -> str:
    """A one-line human summary: name, params, GMACs."""
    return f"{spec.name or 'custom'}: {spec.num_params() / 1e6:.2f} M params, {spec.macs() / 1e9:.2f} GMACs"

