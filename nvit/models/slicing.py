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


def _as_index(values: Sequence[int], size: int, what: str) -> tuple[int, ...]:
    idx = tuple(sorted(int(v) for v in values))
    if not idx:
        raise SpecError(f"{what}: at least one unit must be kept")
    if len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= size:
        raise SpecError(f"{what}: kept indices must be distinct and within 0..{size - 1}")
    return idx


@dataclass(frozen=True)
class BlockKeep:
    """Kept units of one block: head indices, QK/V channel indices within a head, MLP neurons."""

    heads: tuple[int, ...]
    qk: tuple[int, ...]
    v: tuple[int, ...]
    mlp: tuple[int, ...]


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
        return KeepIndices(
            emb=_as_index(self.emb, spec.embed_dim, "embedding channels"),
            blocks=tuple(
                BlockKeep(
                    _as_index(k.heads, b.heads, f"block {i} heads"),
                    _as_index(k.qk, b.qk_dim, f"block {i} qk channels"),
                    _as_index(k.v, b.v_dim, f"block {i} v channels"),
                    _as_index(k.mlp, b.mlp_dim, f"block {i} mlp neurons"),
                )
                for i, (k, b) in enumerate(zip(self.blocks, spec.blocks, strict=True))
            ),
        )

    def sliced_spec(self, spec: ArchSpec) -> ArchSpec:
        blocks = tuple(BlockSpec(len(k.heads), len(k.qk), len(k.v), len(k.mlp)) for k in self.blocks)
        qk_scale = spec.qk_scale
        if qk_scale is None:
            scales = {spec.block_scale(i) for i in range(spec.depth)}
            if len(scales) == 1:
                qk_scale = scales.pop()
            elif any(len(k.qk) != b.qk_dim for k, b in zip(self.blocks, spec.blocks, strict=True)):
                raise SpecError("cannot slice QK channels of a model with per-block default scales; set qk_scale")
        return spec.with_blocks(blocks, embed_dim=len(self.emb), qk_scale=qk_scale)


def keep_from_gates(model: VisionTransformer) -> KeepIndices:
    """Kept indices = units whose gate is non-zero (all units where gates are disabled)."""
    def nz(gate: torch.Tensor | None, size: int) -> tuple[int, ...]:
        if gate is None:
            return tuple(range(size))
        return tuple(int(i) for i in torch.nonzero(gate.detach() != 0).flatten())

    spec = model.spec
    return KeepIndices(
        emb=nz(model.emb_gate, spec.embed_dim),
        blocks=tuple(
            BlockKeep(
                nz(blk.attn.head_gate, b.heads), nz(blk.attn.qk_gate, b.qk_dim),
                nz(blk.attn.v_gate, b.v_dim), nz(blk.mlp.gate, b.mlp_dim),
            )
            for blk, b in zip(model.blocks, spec.blocks, strict=True)
        ),
    )


def apply_keep_as_gates(model: VisionTransformer, keep: KeepIndices) -> None:
    """Enable gates (if needed) and set them to 1 on kept units, 0 elsewhere."""
    keep = keep.validated(model.spec)
    if model.emb_gate is None:
        model.enable_gates()

    def set_gate(gate: torch.Tensor, kept: tuple[int, ...]) -> None:
        with torch.no_grad():
            gate.zero_()
            gate[list(kept)] = 1.0

    set_gate(model.emb_gate, keep.emb)
    for blk, k in zip(model.blocks, keep.blocks, strict=True):
        set_gate(blk.attn.head_gate, k.heads)
        set_gate(blk.attn.qk_gate, k.qk)
        set_gate(blk.attn.v_gate, k.v)
        set_gate(blk.mlp.gate, k.mlp)


def _qkv_rows(k: BlockKeep, b: BlockSpec) -> torch.Tensor:
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

    def take(name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        t = src[name].detach()
        if rows is not None:
            t = t.index_select(0, rows)
        if cols is not None:
            t = t.index_select(1, cols)
        out[name] = t

    take("patch_embed.proj.weight", rows=e)
    take("patch_embed.proj.bias", rows=e)
    for name in ("cls_token", "dist_token", "pos_embed"):
        if name in src:
            out[name] = src[name].detach().index_select(2, e)
    for i, (k, b) in enumerate(zip(keep.blocks, spec.blocks, strict=True)):
        p = f"blocks.{i}."
        rows = _qkv_rows(k, b)
        v_cols = (torch.tensor(k.heads)[:, None] * b.v_dim + torch.tensor(k.v)[None, :]).flatten()
        mlp = torch.tensor(k.mlp)
        for norm in ("norm1", "norm2"):
            take(p + norm + ".weight", rows=e)
            take(p + norm + ".bias", rows=e)
        take(p + "attn.qkv.weight", rows=rows, cols=e)
        take(p + "attn.qkv.bias", rows=rows)
        take(p + "attn.proj.weight", rows=e, cols=v_cols)
        take(p + "attn.proj.bias", rows=e)
        take(p + "mlp.fc1.weight", rows=mlp, cols=e)
        take(p + "mlp.fc1.bias", rows=mlp)
        take(p + "mlp.fc2.weight", rows=e, cols=mlp)
        take(p + "mlp.fc2.bias", rows=e)
    take("norm.weight", rows=e)
    take("norm.bias", rows=e)
    for head in ("head", "head_dist"):
        if head + ".weight" in src:
            take(head + ".weight", cols=e)
            take(head + ".bias")
    new.load_state_dict(out, strict=True)
    return new.train(model.training)
