"""Prunable units, their gates, per-type minimums, dynamic groups, and conversion of masks to a sliced model.

A *gate* is one prunable dimension of the model: the embedding channels (EMB, global), or per block the
heads (HEAD), the QK channels shared by all heads (QK), the V channels shared by all heads (V), the MLP
neurons (MLP), and the whole attention (ATTN_LAYER) and the whole MLP (MLP_LAYER), one unit each: the gate
on the sub-layer's residual branch. Its *units* are its channels (heads for HEAD). The flat unit vector is
the concatenation of the model's gates in :meth:`~nvit.models.VisionTransformer.gate_parameters` order
``[emb, block0 head, block0 qk, block0 v, block0 mlp, block0 attn_layer, block0 mlp_layer, block1 head,
...]`` (a sub-layer the model lacks has no gates), so saliency is one vector over units and the mask of a
whole model one boolean array (:class:`~nvit.pruning.state.PruneState`).

**Sub-layers.** Removing a whole sub-layer is one group of its layer gate, allowed only for the kinds the
layout is told are ``removable`` (``--remove``). Once a sub-layer is gone its width gates are no longer
candidates, the architecture shows it absent (width 0), and a block that lost both is dropped. At least
one block keeps its attention.

**Dynamic groups** (NViT). The pruning loop removes a *group*: ``group_size`` units of one gate (one head
for HEAD). Groups are not fixed chunks: at every pruning step the alive units of each gate are sorted by
their current score and the ``group_size`` lowest form its first group, the next ``group_size`` its second,
and so on (:meth:`~nvit.pruning.state.PruneState.candidates`). A chunk that holds one important unit can
therefore still shed its unimportant ones; any set of units slices exactly (:mod:`nvit.models.slicing`). A
group's saliency is the sum of its units' scores (the diagonal of the Fisher form, as in NViT).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nvit.arch import ArchSpec, BlockSpec, WidthSteps
from nvit.errors import NvitError, SpecError
from nvit.swin import SwinSpec

log = logging.getLogger(__name__)


class PruneError(NvitError):
    """The pruning engine was given an impossible setting or reached an inconsistent state."""


class GroupKind(enum.Enum):
    """Structure types (DESIGN.md §3). The order is the order of gates inside the flat unit vector."""

    EMB = "emb"
    HEAD = "head"
    QK = "qk"
    V = "v"
    MLP = "mlp"
    ATTN_LAYER = "attn_layer"  # a block's whole attention (its residual branch)
    MLP_LAYER = "mlp_layer"  # a block's whole MLP


BLOCK_KINDS: tuple[GroupKind, ...] = (GroupKind.HEAD, GroupKind.QK, GroupKind.V, GroupKind.MLP)
SUBLAYER_KINDS: tuple[GroupKind, ...] = (GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER)
#: The width gates each layer gate switches off with it.
LAYER_WIDTHS: dict[GroupKind, tuple[GroupKind, ...]] = {
    GroupKind.ATTN_LAYER: (GroupKind.HEAD, GroupKind.QK, GroupKind.V), GroupKind.MLP_LAYER: (GroupKind.MLP,)}
LAYER_OF: dict[GroupKind, GroupKind] = {w: layer for layer, ws in LAYER_WIDTHS.items() for w in ws}
KIND_CODES: dict[GroupKind, int] = {k: i for i, k in enumerate(GroupKind)}
GROUP_WIDTH_FIELD: dict[GroupKind, str] = {GroupKind.EMB: "embed_dim", GroupKind.HEAD: "heads", GroupKind.QK: "qk_dim",
                                      GroupKind.V: "v_dim", GroupKind.MLP: "mlp_dim"}
NO_BLOCK = -1  # block index recorded for the EMB gate, which spans every block


@dataclass(frozen=True)
class Minimums:
    """Smallest widths pruning may leave, per type; ``None``: one group (``group_size`` channels).

    Channel minimums are rounded up to whole groups, since widths shrink a group at a time.
    """

    heads: int = 1
    embed_dim: int | None = None
    qk_dim: int | None = None
    v_dim: int | None = None
    mlp_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("heads", "embed_dim", "qk_dim", "v_dim", "mlp_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PruneError(f"minimum {name} must be a positive integer, got {value!r}")

    def of(self, kind: GroupKind, group_size: int) -> int:
        """The minimum width of ``kind``: heads as given, channels rounded up to whole groups."""
        value = getattr(self, GROUP_WIDTH_FIELD[kind])
        if kind is GroupKind.HEAD:
            return int(value)
        return -(-(value or group_size) // group_size) * group_size


@dataclass(frozen=True)
class Gate:
    """One prunable dimension: ``width`` units at ``offset`` in the flat unit vector."""

    kind: GroupKind
    block: int  # NO_BLOCK for EMB
    width: int
    offset: int
    stage: int | None = None  # a Swin's EMB gate: its stage (a ViT's one EMB gate has none)

    @property
    def name(self) -> str:
        if self.kind is GroupKind.EMB:
            return self.kind.value if self.stage is None else f"stage {self.stage} {self.kind.value}"
        return f"block {self.block} {self.kind.value}"


class GroupLayout:
    """The gates of one architecture, how many units form a group, and the minimum width of every gate.

    ``removable`` holds the sub-layer kinds (:data:`SUBLAYER_KINDS`) that pruning may remove whole; the
    others' layer gates stay at their one unit.

    A Swin (:class:`~nvit.swin.SwinSpec`) has one EMB gate per stage, each followed by its stage's blocks (the
    order of :meth:`~nvit.models.swin.SwinTransformer.gate_parameters`); blocks are numbered across stages. A
    Swin block may lose one of its sub-layers but never both: a dropped block would move the blocks after it
    to the other parity of window shifts (:meth:`~nvit.pruning.state.PruneState.removable_groups`).
    """

    def __init__(self, spec: ArchSpec | SwinSpec, *, group_size: int, minimums: Minimums = Minimums(),
                 removable: frozenset[GroupKind] | set[GroupKind] = frozenset()) -> None:
        if not isinstance(group_size, int) or group_size < 1:
            raise PruneError(f"group_size must be a positive integer, got {group_size!r}")
        unknown = set(removable) - set(SUBLAYER_KINDS)
        if unknown:
            raise PruneError(f"only whole sub-layers can be removable, not {sorted(k.value for k in unknown)}")
        self.spec, self.group_size, self.minimums = spec, group_size, minimums
        self.removable = frozenset(removable)
        self.is_swin = isinstance(spec, SwinSpec)
        #: (stage, its embedding width, its blocks); a ViT is one stage of every block
        stages = ([(s, st.embed_dim, st.blocks) for s, st in enumerate(spec.stages)] if self.is_swin
                  else [(None, spec.embed_dim, spec.blocks)])
        widths = [("embed_dim" if s is None else f"stage {s} embed_dim", e) for s, e, _ in stages]
        for i, b in enumerate(spec.blocks):
            widths += [(f"block {i} {name}", getattr(b, name)) for name in ("qk_dim", "v_dim", "mlp_dim")]
        for what, width in widths:
            if width % group_size:
                raise PruneError(f"{what} {width} is not a multiple of group_size {group_size}")
        gates: list[Gate] = []
        mins: list[int] = []

        def add(kind: GroupKind, block: int, width: int, stage: int | None = None) -> None:
            minimum = int(kind not in self.removable) if kind in SUBLAYER_KINDS else minimums.of(kind, group_size)
            if minimum > width:
                where = (("the model's" if stage is None else f"stage {stage}'s") if kind is GroupKind.EMB
                         else f"block {block}'s")
                field = GROUP_WIDTH_FIELD[kind]
                raise PruneError(f"minimum {field} {minimum} exceeds {where} {field} {width}")
            gates.append(Gate(kind, block, width, sum(g.width for g in gates), stage))
            mins.append(minimum)

        i = 0
        for s, e, blocks in stages:
            add(GroupKind.EMB, NO_BLOCK, e, s)
            for b in blocks:
                kinds = [k for k in BLOCK_KINDS if (b.has_mlp if k is GroupKind.MLP else b.has_attn)]
                kinds += [k for k, present in zip(SUBLAYER_KINDS, (b.has_attn, b.has_mlp), strict=True) if present]
                for kind in kinds:
                    add(kind, i, 1 if kind in SUBLAYER_KINDS else getattr(b, GROUP_WIDTH_FIELD[kind]))
                i += 1
        self.stage_sizes = tuple(len(blocks) for _, _, blocks in stages)
        self.gates: tuple[Gate, ...] = tuple(gates)
        #: (kind, block) → gate; (EMB, NO_BLOCK) is the first stage's EMB gate (a ViT's only one)
        self.gate_index: dict[tuple[GroupKind, int], int] = {}
        for j, g in enumerate(gates):
            self.gate_index.setdefault((g.kind, g.block), j)
        self.emb_gates: tuple[int, ...] = tuple(j for j, g in enumerate(gates) if g.kind is GroupKind.EMB)
        self.gate_sizes: tuple[int, ...] = tuple(g.width for g in gates)
        self.gate_kind = np.array([KIND_CODES[g.kind] for g in gates], dtype=np.int64)
        self.gate_block = np.array([g.block for g in gates], dtype=np.int64)
        self.gate_group = np.array([1 if g.kind is GroupKind.HEAD or g.kind in SUBLAYER_KINDS else group_size
                                    for g in gates], dtype=np.int64)
        self.gate_min = np.array(mins, dtype=np.int64)
        #: per gate, the layer gate that switches it off with its sub-layer (-1: none, EMB and layer gates)
        self.gate_layer = np.array([self.gate_index.get((LAYER_OF[g.kind], g.block), -1) if g.kind in LAYER_OF
                                    else -1 for g in gates], dtype=np.int64)
        #: per gate, the block's other layer gate (-1: none, or not a layer gate)
        other = {GroupKind.ATTN_LAYER: GroupKind.MLP_LAYER, GroupKind.MLP_LAYER: GroupKind.ATTN_LAYER}
        self.gate_sibling = np.array([self.gate_index.get((other[g.kind], g.block), -1) if g.kind in other else -1
                                      for g in gates], dtype=np.int64)
        self.unit_gate = np.repeat(np.arange(len(gates)), self.gate_sizes)
        self.unit_kind = self.gate_kind[self.unit_gate]
        self.spec_at(np.array(self.gate_sizes))  # fails early if the attention scale cannot be fixed

    @property
    def num_units(self) -> int:
        return int(sum(self.gate_sizes))

    def unit_step(self) -> WidthSteps:
        """Channels removed by one group of each type, as the latency predictor's ``delta_ms`` wants it."""
        g = self.group_size
        return WidthSteps(heads=1, qk_dim=g, v_dim=g, mlp_dim=g, embed_dim=g)

    def gates_of(self, kind: GroupKind, block: int | None = None) -> np.ndarray:
        sel = self.gate_kind == KIND_CODES[kind]
        if block is not None:
            sel &= self.gate_block == block
        return np.flatnonzero(sel)

    def units_of(self, gate: int) -> np.ndarray:
        g = self.gates[gate]
        return np.arange(g.offset, g.offset + g.width)

    def unit_name(self, unit: int) -> str:
        """``block 1 mlp 17``, ``block 0 head 2``, ``emb 5``: the gate and the unit's index in it."""
        gate = self.gates[int(self.unit_gate[unit])]
        return f"{gate.name} {unit - gate.offset}"

    def check_model(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The model's gates, checked against this layout (gates must be enabled)."""
        gates = model.gate_parameters()
        sizes = tuple(int(g.numel()) for g in gates)
        if sizes != self.gate_sizes:
            raise PruneError("the model's gates do not match the pruning layout (enable gates on the same arch)")
        return gates

    def block_specs(self, gate_widths: Sequence[int] | np.ndarray) -> list[BlockSpec | None]:
        """Per block of the layout's architecture, its widths at ``gate_widths`` (``None``: dropped)."""
        out: list[BlockSpec | None] = []
        for i in range(self.spec.depth):
            def width(kind: GroupKind, i: int = i) -> int:
                j = self.gate_index.get((kind, i))
                return 0 if j is None else int(gate_widths[j])

            attn = width(GroupKind.ATTN_LAYER) > 0
            mlp = width(GroupKind.MLP_LAYER) > 0
            widths = [width(k) if attn else 0 for k in (GroupKind.HEAD, GroupKind.QK, GroupKind.V)]
            out.append(BlockSpec(*widths, width(GroupKind.MLP) if mlp else 0) if attn or mlp else None)
        return out

    def per_stage(self, blocks: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Per-block values (numbered across stages) grouped by stage."""
        bounds = np.cumsum((0, *self.stage_sizes))
        return [tuple(blocks[int(a):int(b)]) for a, b in itertools.pairwise(bounds)]

    def spec_at(self, gate_widths: Sequence[int] | np.ndarray) -> ArchSpec | SwinSpec:
        """The architecture with gate ``g`` at width ``gate_widths[g]`` (gates in this layout's order): a removed
        sub-layer has width 0, a block without either is dropped."""
        if self.is_swin:
            blocks = self.block_specs(gate_widths)
            try:
                spec = self.spec.with_widths([int(gate_widths[j]) for j in self.emb_gates], self.per_stage(blocks))
            except SpecError as exc:
                raise PruneError(str(exc)) from None
            if not any(b.has_attn and b.qk_dim != a.qk_dim for b, a in zip(blocks, self.spec.blocks, strict=True)):
                spec = dataclasses.replace(spec, qk_scale=self.spec.qk_scale)  # as slicing keeps it
            return spec
        blocks = tuple(b for b in self.block_specs(gate_widths) if b is not None)
        if not blocks:
            raise PruneError("the widths remove every block")
        return _with_widths(self.spec, int(gate_widths[0]), blocks)

    def minimal_widths(self) -> np.ndarray:
        """Every gate at its minimum, except that the first block with attention keeps it, and a Swin block
        keeps one sub-layer (its MLP, where both could go)."""
        widths = self.gate_min.copy()
        if GroupKind.ATTN_LAYER in self.removable:
            attn = self.gates_of(GroupKind.ATTN_LAYER)
            if attn.size:
                widths[attn[0]] = 1
        if self.is_swin:
            for j in self.gates_of(GroupKind.MLP_LAYER):
                sibling = self.gate_sibling[j]
                if widths[j] == 0 and (sibling < 0 or widths[sibling] == 0):
                    widths[j] = 1
        return widths

    def minimal_spec(self) -> ArchSpec:
        """The architecture with every gate at its minimum: the smallest latency pruning can reach."""
        return self.spec_at(self.minimal_widths())


def _with_widths(spec: ArchSpec, embed_dim: int, blocks: tuple[BlockSpec, ...]) -> ArchSpec:
    """``spec`` at other widths with the attention scale fixed exactly as slicing fixes it."""
    qk_scale = spec.qk_scale
    if qk_scale is None:
        scales = spec.attention_scales()
        if len(scales) > 1:
            raise PruneError("blocks have different default attention scales; set qk_scale in the arch to prune")
        qk_scale = scales.pop() if scales else None
    return spec.with_blocks(blocks, embed_dim=embed_dim, qk_scale=qk_scale)
