"""Prunable groups, their gates, per-type minimums, and conversion of the final masks to a sliced model.

A *group* is the smallest thing the pruning loop removes at once: ``group_size`` consecutive embedding
channels (EMB, global), one head (HEAD), ``group_size`` QK channels shared by all heads of a block (QK),
``group_size`` V channels shared by all heads of a block (V), or ``group_size`` MLP neurons (MLP).

Every group is a contiguous segment of the *flat gate vector*: the concatenation of the model's gates in
:meth:`~nvit.models.VisionTransformer.gate_parameters` order ``[emb, block0 head, block0 qk, block0 v,
block0 mlp, block1 head, ...]``. That makes the per-group sums of gate gradients one ``index_add``, and the
mask of a whole model one boolean array over groups (:class:`PruneState`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import NvitError
from nvit.lut.base import UnitStep
from nvit.models.slicing import BlockKeep, KeepIndices, apply_keep_as_gates
from nvit.models.vit import VisionTransformer

log = logging.getLogger(__name__)


class PruneError(NvitError):
    """The pruning engine was given an impossible setting or reached an inconsistent state."""


class GroupKind(enum.Enum):
    """Structure types (DESIGN.md §3). The order is the order of gates inside the flat gate vector."""

    EMB = "emb"
    HEAD = "head"
    QK = "qk"
    V = "v"
    MLP = "mlp"


BLOCK_KINDS: tuple[GroupKind, ...] = (GroupKind.HEAD, GroupKind.QK, GroupKind.V, GroupKind.MLP)
KIND_CODES: dict[GroupKind, int] = {k: i for i, k in enumerate(GroupKind)}
NO_BLOCK = -1  # block index recorded for EMB groups, which span every block


@dataclass(frozen=True)
class Minimums:
    """Smallest widths pruning may leave. QK, V and MLP keep at least one group (``group_size`` channels)."""

    heads: int = 1
    embed_dim: int = 64

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise PruneError(f"minimum heads must be at least 1, got {self.heads}")
        if self.embed_dim < 1:
            raise PruneError(f"minimum embed_dim must be at least 1, got {self.embed_dim}")


@dataclass(frozen=True)
class Group:
    """One prunable group: units ``start:stop`` of its gate (heads for HEAD, channels/neurons otherwise)."""

    kind: GroupKind
    block: int  # NO_BLOCK for EMB
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        where = "" if self.kind is GroupKind.EMB else f"block {self.block} "
        if self.kind is GroupKind.HEAD:
            return f"{where}head {self.start}"
        return f"{where}{self.kind.value}[{self.start}:{self.stop}]"


class GroupLayout:
    """All prunable groups of one architecture, in flat-gate-vector order, with vectorised metadata."""

    def __init__(self, spec: ArchSpec, *, group_size: int, minimums: Minimums = Minimums()) -> None:
        if group_size < 1:
            raise PruneError(f"group_size must be a positive integer, got {group_size}")
        self.spec, self.group_size, self.minimums = spec, group_size, minimums
        widths = [("embed_dim", spec.embed_dim)]
        for i, b in enumerate(spec.blocks):
            widths += [(f"block {i} {name}", getattr(b, name)) for name in ("qk_dim", "v_dim", "mlp_dim")]
        for what, width in widths:
            if width % group_size:
                raise PruneError(f"{what} {width} is not a multiple of group_size {group_size}")
        if minimums.embed_dim > spec.embed_dim:
            raise PruneError(f"minimum embed_dim {minimums.embed_dim} exceeds the model's embed_dim {spec.embed_dim}")
        if any(b.heads < minimums.heads for b in spec.blocks):
            raise PruneError(f"minimum heads {minimums.heads} exceeds the heads of some block")

        groups: list[Group] = []
        gate_sizes: list[int] = []

        def add(kind: GroupKind, block: int, width: int, step: int) -> None:
            groups.extend(Group(kind, block, s, s + step) for s in range(0, width, step))
            gate_sizes.append(width)

        add(GroupKind.EMB, NO_BLOCK, spec.embed_dim, group_size)
        for i, b in enumerate(spec.blocks):
            add(GroupKind.HEAD, i, b.heads, 1)
            add(GroupKind.QK, i, b.qk_dim, group_size)
            add(GroupKind.V, i, b.v_dim, group_size)
            add(GroupKind.MLP, i, b.mlp_dim, group_size)
        self.groups: tuple[Group, ...] = tuple(groups)
        self.gate_sizes: tuple[int, ...] = tuple(gate_sizes)
        self.kind_code = np.array([KIND_CODES[g.kind] for g in groups], dtype=np.int64)
        self.block = np.array([g.block for g in groups], dtype=np.int64)
        self.size = np.array([g.size for g in groups], dtype=np.int64)
        # which group each unit of the flat gate vector belongs to (groups are contiguous and in order)
        self.unit_group = torch.from_numpy(np.repeat(np.arange(len(groups)), self.size))
        _with_widths(spec, spec.embed_dim, spec.blocks)  # fails early if the attention scale cannot be fixed

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def num_units(self) -> int:
        return int(self.size.sum())

    def unit_step(self) -> UnitStep:
        """Channels removed by one group of each type, as the latency predictor's ``delta_ms`` wants it."""
        g = self.group_size
        return UnitStep(emb=g, heads=1, qk=g, v=g, mlp=g)

    def indices_of(self, kind: GroupKind, block: int | None = None) -> np.ndarray:
        sel = self.kind_code == KIND_CODES[kind]
        if block is not None:
            sel &= self.block == block
        return np.flatnonzero(sel)

    def check_model(self, model: VisionTransformer) -> list[torch.nn.Parameter]:
        """The model's gates, checked against this layout (gates must be enabled)."""
        gates = model.gate_parameters()
        sizes = tuple(int(g.numel()) for g in gates)
        if sizes != self.gate_sizes:
            raise PruneError("the model's gates do not match the pruning layout (enable gates on the same arch)")
        return gates

    def minimal_spec(self) -> ArchSpec:
        """The architecture with every group type at its minimum: the smallest latency pruning can reach."""
        g, m = self.group_size, self.minimums
        emb = -(-m.embed_dim // g) * g  # rounded up to whole groups
        blocks = tuple(BlockSpec(m.heads, g, g, g) for _ in self.spec.blocks)
        return _with_widths(self.spec, emb, blocks)


def _with_widths(spec: ArchSpec, embed_dim: int, blocks: tuple[BlockSpec, ...]) -> ArchSpec:
    """``spec`` at other widths with the attention scale fixed exactly as slicing fixes it."""
    qk_scale = spec.qk_scale
    if qk_scale is None:
        scales = {spec.block_scale(i) for i in range(spec.depth)}
        if len(scales) != 1:
            raise PruneError("blocks have different default attention scales; set qk_scale in the arch to prune")
        qk_scale = scales.pop()
    return spec.with_blocks(blocks, embed_dim=embed_dim, qk_scale=qk_scale)


class PruneState:
    """Which groups are alive, plus running widths so that minimum checks and specs cost microseconds."""

    def __init__(self, layout: GroupLayout, alive: np.ndarray | None = None) -> None:
        self.layout = layout
        self.alive = np.ones(len(layout), dtype=bool) if alive is None else np.asarray(alive, dtype=bool).copy()
        if self.alive.shape != (len(layout),):
            raise PruneError(f"mask has {self.alive.size} entries, the layout has {len(layout)} groups")
        depth = layout.spec.depth
        self._block_widths = np.zeros((depth, len(BLOCK_KINDS)), dtype=np.int64)
        live = self.alive
        for j, kind in enumerate(BLOCK_KINDS):
            sel = (layout.kind_code == KIND_CODES[kind]) & live
            np.add.at(self._block_widths[:, j], layout.block[sel], layout.size[sel])
        self._emb = int(layout.size[(layout.kind_code == KIND_CODES[GroupKind.EMB]) & live].sum())
        g, m = layout.group_size, layout.minimums
        self._block_min = np.array([m.heads, g, g, g], dtype=np.int64)
        if self._emb < m.embed_dim or (self._block_widths < self._block_min).any():
            raise PruneError("the mask leaves a group type below its minimum width")

    @property
    def num_pruned(self) -> int:
        return int((~self.alive).sum())

    def removable(self, index: int) -> bool:
        """Whether group ``index`` is alive and removing it keeps its type at or above the minimum."""
        if not self.alive[index]:
            return False
        lay = self.layout
        size = int(lay.size[index])
        code = int(lay.kind_code[index])
        if code == KIND_CODES[GroupKind.EMB]:
            return self._emb - size >= lay.minimums.embed_dim
        j = code - 1
        return self._block_widths[lay.block[index], j] - size >= self._block_min[j]

    def candidates(self) -> np.ndarray:
        """Indices of all groups that could be removed right now (each on its own)."""
        lay = self.layout
        is_emb = lay.kind_code == KIND_CODES[GroupKind.EMB]
        left = np.empty(len(lay), dtype=np.int64)
        minimum = np.empty(len(lay), dtype=np.int64)
        left[is_emb], minimum[is_emb] = self._emb, lay.minimums.embed_dim
        blk = ~is_emb
        cols = lay.kind_code[blk] - 1
        left[blk], minimum[blk] = self._block_widths[lay.block[blk], cols], self._block_min[cols]
        return np.flatnonzero(self.alive & (left - lay.size >= minimum))

    def remove(self, index: int) -> None:
        if not self.removable(index):
            raise PruneError(f"{self.layout.groups[index].name} cannot be removed (pruned already or at minimum)")
        lay = self.layout
        self.alive[index] = False
        code = int(lay.kind_code[index])
        if code == KIND_CODES[GroupKind.EMB]:
            self._emb -= int(lay.size[index])
        else:
            self._block_widths[lay.block[index], code - 1] -= int(lay.size[index])

    def spec(self) -> ArchSpec:
        """The architecture at the current widths (what the latency predictor is asked about)."""
        blocks = tuple(BlockSpec(*(int(w) for w in row)) for row in self._block_widths)
        return _with_widths(self.layout.spec, self._emb, blocks)

    def keep_indices(self) -> KeepIndices:
        """Kept units of every gate, for :func:`nvit.models.slice_model`."""
        lay = self.layout
        kept: list[tuple[int, ...]] = []
        for kind, block in _gate_order(lay.spec.depth):
            idx = lay.indices_of(kind, block)
            kept.append(tuple(u for i in idx if self.alive[i] for u in range(lay.groups[i].start, lay.groups[i].stop)))
        emb, rest = kept[0], kept[1:]
        blocks = tuple(BlockKeep(*rest[4 * i : 4 * i + 4]) for i in range(lay.spec.depth))
        return KeepIndices(emb=emb, blocks=blocks)

    def apply(self, model: VisionTransformer) -> None:
        """Set the model's gates: 1 on units of alive groups, 0 on pruned ones (gates enabled if needed)."""
        apply_keep_as_gates(model, self.keep_indices())
        self.layout.check_model(model)

    def pruned_names(self) -> list[str]:
        return [self.layout.groups[i].name for i in np.flatnonzero(~self.alive)]


def _gate_order(depth: int) -> list[tuple[GroupKind, int | None]]:
    order: list[tuple[GroupKind, int | None]] = [(GroupKind.EMB, None)]
    for i in range(depth):
        order += [(kind, i) for kind in BLOCK_KINDS]
    return order


def widths_row(spec: ArchSpec) -> dict[str, int]:
    """Flat per-block widths (``b0_heads``, ``b0_qk_dim``, ...) plus ``embed_dim``, for logs and reports."""
    row = {"embed_dim": spec.embed_dim}
    for i, b in enumerate(spec.blocks):
        row.update({f"b{i}_{name}": getattr(b, name) for name in ("heads", "qk_dim", "v_dim", "mlp_dim")})
    return row

