"""Physically remove pruned units: build the smaller dense model that keeps the given indices.

The oracle for this module is the gated model: a :class:`VisionTransformer` whose removed units have a gate
of zero computes exactly what the sliced model computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import SpecError
from nvit.models.vit import VisionTransformer


def as_index(values: Sequence[int], size: int, what: str, *, may_be_empty: bool = False) -> tuple[int, ...]:
    idx = tuple(sorted(int(v) for v in values))
    if not idx:
        if may_be_empty:
            return idx
        raise SpecError(f"{what}: at least one unit must be kept")
    if len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= size:
        raise SpecError(f"{what}: kept indices must be distinct and within 0..{size - 1}")
    return idx


@dataclass(frozen=True)
class BlockKeep:
    """Kept units of one block: head indices, QK/V channel indices within a head, MLP neurons.

    No heads kept (and then no QK/V channels) removes the attention sub-layer, no neurons the MLP; a block
    that keeps neither is dropped from the sliced model.
    """

    heads: tuple[int, ...]
    qk: tuple[int, ...]
    v: tuple[int, ...]
    mlp: tuple[int, ...]

    @property
    def has_attn(self) -> bool:
        return bool(self.heads)

    @property
    def kept(self) -> bool:
        return bool(self.heads) or bool(self.mlp)


@dataclass(frozen=True)
class KeepIndices:
    """Kept units of every prunable group of a model (embedding channels are global)."""

    emb: tuple[int, ...]
    blocks: tuple[BlockKeep, ...]

    @classmethod
    def full(cls, spec: ArchSpec) -> KeepIndices:
        return cls(
            emb=tuple(range(spec.embed_dim)),
            blocks=tuple(
                BlockKeep(tuple(range(b.heads)), tuple(range(b.qk_dim)), tuple(range(b.v_dim)), tuple(range(b.mlp_dim)))
                for b in spec.blocks
            ),
        )

    def validated(self, spec: ArchSpec) -> KeepIndices:
        if len(self.blocks) != spec.depth:
            raise SpecError(f"keep indices describe {len(self.blocks)} blocks, the model has {spec.depth}")
        blocks = []
        for i, (k, b) in enumerate(zip(self.blocks, spec.blocks, strict=True)):
            heads = as_index(k.heads, b.heads, f"block {i} heads", may_be_empty=True)
            attn = bool(heads)
            keep = BlockKeep(
                heads,
                as_index(k.qk, b.qk_dim, f"block {i} qk channels", may_be_empty=not attn) if attn else (),
                as_index(k.v, b.v_dim, f"block {i} v channels", may_be_empty=not attn) if attn else (),
                as_index(k.mlp, b.mlp_dim, f"block {i} mlp neurons", may_be_empty=True),
            )
            blocks.append(keep)
        if not any(k.kept for k in blocks):
            raise SpecError("the keep indices remove every block")
        return KeepIndices(emb=as_index(self.emb, spec.embed_dim, "embedding channels"), blocks=tuple(blocks))

    def sliced_spec(self, spec: ArchSpec) -> ArchSpec:
        blocks = tuple(BlockSpec(len(k.heads), len(k.qk), len(k.v), len(k.mlp)) for k in self.blocks if k.kept)
        qk_scale = spec.qk_scale
        if qk_scale is None:
            scales = spec.attention_scales()
            if len(scales) == 1:
                qk_scale = scales.pop()
            elif any(k.has_attn and len(k.qk) != b.qk_dim for k, b in zip(self.blocks, spec.blocks, strict=True)):
                raise SpecError("cannot slice QK channels of a model with per-block default scales; set qk_scale")
        return spec.with_blocks(blocks, embed_dim=len(self.emb), qk_scale=qk_scale)


def kept_units(gate: torch.Tensor | None, size: int) -> tuple[int, ...]:
    """The units whose gate is non-zero (all ``size`` where gates are disabled)."""
    if gate is None:
        return tuple(range(size))
    return tuple(int(i) for i in torch.nonzero(gate.detach() != 0).flatten())


def _branch_off(branch_gate: torch.Tensor | None) -> bool:
    return branch_gate is not None and bool((branch_gate.detach() == 0).all())


def block_keep_from_gates(block: torch.nn.Module, spec: BlockSpec) -> BlockKeep:
    """A block's kept units from its gates; a sub-layer whose branch gate is zero keeps nothing."""
    if block.attn is None or _branch_off(block.attn_gate):
        attn: tuple[tuple[int, ...], ...] = ((), (), ())
    else:
        a = block.attn
        attn = (kept_units(a.head_gate, spec.heads), kept_units(a.qk_gate, spec.qk_dim),
                kept_units(a.v_gate, spec.v_dim))
    mlp = () if block.mlp is None or _branch_off(block.mlp_gate) else kept_units(block.mlp.gate, spec.mlp_dim)
    return BlockKeep(*attn, mlp)


def set_gate(gate: torch.Tensor, kept: tuple[int, ...]) -> None:
    """1 on the kept units, 0 elsewhere."""
    with torch.no_grad():
        gate.zero_()
        gate[list(kept)] = 1.0


def apply_block_keep(block: torch.nn.Module, keep: BlockKeep) -> None:
    """A block's gates set to ``keep`` (a removed sub-layer's branch gate and all its unit gates 0)."""
    if block.attn is not None:
        set_gate(block.attn.head_gate, keep.heads)
        set_gate(block.attn.qk_gate, keep.qk)
        set_gate(block.attn.v_gate, keep.v)
        set_gate(block.attn_gate, (0,) if keep.heads else ())
    if block.mlp is not None:
        set_gate(block.mlp.gate, keep.mlp)
        set_gate(block.mlp_gate, (0,) if keep.mlp else ())


def keep_from_gates(model: VisionTransformer) -> KeepIndices:
    """Kept indices = units whose gate is non-zero (all units where gates are disabled); a sub-layer whose
    branch gate is zero keeps nothing."""
    spec = model.spec
    blocks = tuple(block_keep_from_gates(blk, b) for blk, b in zip(model.blocks, spec.blocks, strict=True))
    return KeepIndices(emb=kept_units(model.emb_gate, spec.embed_dim), blocks=blocks)


def apply_keep_as_gates(model: VisionTransformer, keep: KeepIndices) -> None:
    """Enable gates (if needed) and set them to 1 on kept units, 0 elsewhere (a removed sub-layer's branch
    gate and all its unit gates 0)."""
    keep = keep.validated(model.spec)
    if model.emb_gate is None:
        model.enable_gates()
    set_gate(model.emb_gate, keep.emb)
    for blk, k in zip(model.blocks, keep.blocks, strict=True):
        apply_block_keep(blk, k)


def qkv_rows(k: BlockKeep, b: BlockSpec) -> torch.Tensor:
    """Rows of the fused qkv weight kept for ``k``: Q and K rows (head-major), then V rows."""
    heads = torch.tensor(k.heads)
    q_rows = (heads[:, None] * b.qk_dim + torch.tensor(k.qk)[None, :]).flatten()
    v_rows = (heads[:, None] * b.v_dim + torch.tensor(k.v)[None, :]).flatten()
    qk_width = b.heads * b.qk_dim
    return torch.cat([q_rows, q_rows + qk_width, v_rows + 2 * qk_width])


def slice_model(model: VisionTransformer, keep: KeepIndices | None = None) -> VisionTransformer:
    """A new dense model holding only the kept units (from the gates when ``keep`` is ``None``)."""
    spec = model.spec
    keep = (keep or keep_from_gates(model)).validated(spec)
    new = VisionTransformer(keep.sliced_spec(spec))
    e = torch.tensor(keep.emb)
    src = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}

    def take(name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
             to: str | None = None) -> None:
        t = src[name].detach()
        if rows is not None:
            t = t.index_select(0, rows)
        if cols is not None:
            t = t.index_select(1, cols)
        out[to or name] = t

    take("patch_embed.proj.weight", rows=e)
    take("patch_embed.proj.bias", rows=e)
    for name in ("cls_token", "dist_token", "pos_embed"):
        if name in src:
            out[name] = src[name].detach().index_select(2, e)
    kept_blocks = [(i, k, b) for i, (k, b) in enumerate(zip(keep.blocks, spec.blocks, strict=True)) if k.kept]
    for j, (i, k, b) in enumerate(kept_blocks):  # a dropped block's successors move up
        layers: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []  # (layer, weight rows, weight cols)
        if k.has_attn:
            rows = qkv_rows(k, b)
            v_cols = (torch.tensor(k.heads)[:, None] * b.v_dim + torch.tensor(k.v)[None, :]).flatten()
            layers += [("norm1", e, None), ("attn.qkv", rows, e), ("attn.proj", e, v_cols)]
        if k.mlp:
            mlp = torch.tensor(k.mlp)
            layers += [("norm2", e, None), ("mlp.fc1", mlp, e), ("mlp.fc2", e, mlp)]
        for layer, rows, cols in layers:
            src_name, dst_name = f"blocks.{i}.{layer}", f"blocks.{j}.{layer}"
            take(src_name + ".weight", rows=rows, cols=cols, to=dst_name + ".weight")
            take(src_name + ".bias", rows=rows, to=dst_name + ".bias")
    take("norm.weight", rows=e)
    take("norm.bias", rows=e)
    for head in ("head", "head_dist"):
        if head + ".weight" in src:
            take(head + ".weight", cols=e)
            take(head + ".bias")
    new.load_state_dict(out, strict=True)
    return new.train(model.training)
