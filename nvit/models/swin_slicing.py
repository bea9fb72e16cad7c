"""Physically remove a Swin's pruned units: the smaller dense Swin that keeps the given indices.

The oracle, as for the ViT (:mod:`nvit.models.slicing`), is the gated model: a
:class:`~nvit.models.swin.SwinTransformer` whose removed units have a gate of zero computes exactly what the
sliced model computes. A stage's embedding channels are one group shared by the stage's blocks, the patch
merging that feeds the stage (its output rows) and the one that leaves it (its input: the same channels in each
of the four 2×2 positions), and the patch embedding (first stage) or the final norm and head (last stage).
A removed head takes its column of the relative-position bias table with it. Blocks stay in place even when
they keep nothing but one sub-layer: which blocks shift their windows depends on their position in the stage,
so a block that keeps neither sub-layer is refused rather than dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nvit.arch import BlockSpec
from nvit.errors import SpecError
from nvit.models.slicing import (
    BlockKeep,
    apply_block_keep,
    as_index,
    block_keep_from_gates,
    kept_units,
    qkv_rows,
    set_gate,
)
from nvit.models.swin import SwinTransformer
from nvit.swin import SwinSpec, SwinStage


@dataclass(frozen=True)
class StageKeep:
    """Kept embedding channels of one stage and the kept units of each of its blocks."""

    emb: tuple[int, ...]
    blocks: tuple[BlockKeep, ...]


@dataclass(frozen=True)
class SwinKeep:
    stages: tuple[StageKeep, ...]

    @classmethod
    def full(cls, spec: SwinSpec) -> SwinKeep:
        return cls(tuple(StageKeep(tuple(range(s.embed_dim)), tuple(
            BlockKeep(tuple(range(b.heads)), tuple(range(b.qk_dim)), tuple(range(b.v_dim)), tuple(range(b.mlp_dim)))
            for b in s.blocks)) for s in spec.stages))

    def validated(self, spec: SwinSpec) -> SwinKeep:
        if len(self.stages) != spec.num_stages:
            raise SpecError(f"keep indices describe {len(self.stages)} stages, the model has {spec.num_stages}")
        stages = []
        for s, (keep, stage) in enumerate(zip(self.stages, spec.stages, strict=True)):
            if len(keep.blocks) != stage.depth:
                raise SpecError(f"stage {s}: keep indices describe {len(keep.blocks)} blocks, it has {stage.depth}")
            blocks = []
            for j, (k, b) in enumerate(zip(keep.blocks, stage.blocks, strict=True)):
                where = f"stage {s} block {j}"
                heads = as_index(k.heads, b.heads, f"{where} heads", may_be_empty=True)
                attn = bool(heads)
                k = BlockKeep(heads,
                              as_index(k.qk, b.qk_dim, f"{where} qk channels") if attn else (),
                              as_index(k.v, b.v_dim, f"{where} v channels") if attn else (),
                              as_index(k.mlp, b.mlp_dim, f"{where} mlp neurons", may_be_empty=True))
                if not k.kept:
                    raise SpecError(f"{where} would keep neither sub-layer; a Swin block cannot be dropped (the "
                                    "shifts of the blocks after it depend on its place)")
                blocks.append(k)
            stages.append(StageKeep(as_index(keep.emb, stage.embed_dim, f"stage {s} embedding channels"),
                                    tuple(blocks)))
        return SwinKeep(tuple(stages))

    def sliced_spec(self, spec: SwinSpec) -> SwinSpec:
        sliced_qk = any(k.has_attn and len(k.qk) != b.qk_dim for ks, st in zip(self.stages, spec.stages, strict=True)
                        for k, b in zip(ks.blocks, st.blocks, strict=True))
        stages = tuple(SwinStage(len(ks.emb), tuple(BlockSpec(len(k.heads), len(k.qk), len(k.v), len(k.mlp))
                                                    for k in ks.blocks)) for ks in self.stages)
        return dataclasses.replace(spec, stages=stages,
                                   qk_scale=spec.shared_scale() if sliced_qk else spec.qk_scale)


def keep_from_swin_gates(model: SwinTransformer) -> SwinKeep:
    """Kept indices = units whose gate is non-zero (every unit where gates are disabled); a sub-layer whose
    branch gate is zero keeps nothing."""
    return SwinKeep(tuple(
        StageKeep(kept_units(layer.emb_gate, stage.embed_dim),
                  tuple(block_keep_from_gates(blk, b) for blk, b in zip(layer.blocks, stage.blocks, strict=True)))
        for layer, stage in zip(model.layers, model.spec.stages, strict=True)))


def apply_swin_keep(model: SwinTransformer, keep: SwinKeep) -> None:
    """Enable gates (if needed) and set them to 1 on kept units, 0 elsewhere."""
    keep = keep.validated(model.spec)
    if model.layers[0].emb_gate is None:
        model.enable_gates()
    for layer, ks in zip(model.layers, keep.stages, strict=True):
        set_gate(layer.emb_gate, ks.emb)
        for blk, k in zip(layer.blocks, ks.blocks, strict=True):
            apply_block_keep(blk, k)


def slice_swin(model: SwinTransformer, keep: SwinKeep | None = None) -> SwinTransformer:
    """A new dense Swin holding only the kept units (from the gates when ``keep`` is ``None``)."""
    spec = model.spec
    keep = (keep or keep_from_swin_gates(model)).validated(spec)
    new = SwinTransformer(keep.sliced_spec(spec)).to(dtype=next(model.parameters()).dtype)
    src = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}

    def take(name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        t = src[name].detach()
        if rows is not None:
            t = t.index_select(0, rows)
        if cols is not None:
            t = t.index_select(1, cols)
        out[name] = t

    embs = [torch.tensor(ks.emb) for ks in keep.stages]
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                 "patch_embed.norm.bias"):
        take(name, rows=embs[0])
    for s, (ks, stage) in enumerate(zip(keep.stages, spec.stages, strict=True)):
        e = embs[s]
        if s:
            e_in, width_in = embs[s - 1], spec.stages[s - 1].embed_dim
            merged = torch.cat([e_in + g * width_in for g in range(4)])  # the same channels at each 2×2 position
            take(f"layers.{s}.downsample.norm.weight", rows=merged)
            take(f"layers.{s}.downsample.norm.bias", rows=merged)
            take(f"layers.{s}.downsample.reduction.weight", rows=e, cols=merged)
        for j, (k, b) in enumerate(zip(ks.blocks, stage.blocks, strict=True)):
            p = f"layers.{s}.blocks.{j}."
            layers: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
            if k.has_attn:
                v_cols = (torch.tensor(k.heads)[:, None] * b.v_dim + torch.tensor(k.v)[None, :]).flatten()
                layers += [("norm1", e, None), ("attn.qkv", qkv_rows(k, b), e), ("attn.proj", e, v_cols)]
                take(p + "attn.relative_position_bias_table", cols=torch.tensor(k.heads))
            if k.mlp:
                mlp = torch.tensor(k.mlp)
                layers += [("norm2", e, None), ("mlp.fc1", mlp, e), ("mlp.fc2", e, mlp)]
            for layer, rows, cols in layers:
                take(p + layer + ".weight", rows=rows, cols=cols)
                take(p + layer + ".bias", rows=rows)
    take("norm.weight", rows=embs[-1])
    take("norm.bias", rows=embs[-1])
    take("head.weight", cols=embs[-1])
    take("head.bias")
    new.load_state_dict(out, strict=True)
    return new.train(model.training)
