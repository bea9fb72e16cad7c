"""The state of one pruning run: which units are alive, the groups that may go next, and the sliced result.

:class:`PruneState` holds one boolean per unit of a :class:`~nvit.pruning.groups.GroupLayout` and the running
width of every gate, so minimum checks and the architecture at any step are cheap. At each step it forms the
dynamic groups of every gate that can shrink (:class:`Candidates`), removes the chosen ones, and gives the kept
units for exact slicing (:mod:`nvit.models.slicing`, :mod:`nvit.models.swin_slicing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nvit.arch import ArchSpec, BlockSpec
from nvit.models.slicing import BlockKeep, KeepIndices, apply_keep_as_gates
from nvit.models.swin import SwinTransformer
from nvit.models.swin_slicing import StageKeep, SwinKeep, apply_swin_keep
from nvit.models.vit import VisionTransformer
from nvit.pruning.groups import BLOCK_KINDS, KIND_CODES, SUBLAYER_KINDS, GroupKind, GroupLayout, PruneError
from nvit.swin import SwinSpec


@dataclass(frozen=True)
class Candidates:
    """The groups that may be removed at one pruning step, formed from the current unit scores.

    Group ``i`` holds ``units[i]`` of gate ``gate[i]``; it is that gate's ``rank[i]``-th group in ascending
    score order, and ``saliency[i]`` is the sum of its units' scores.
    """

    gate: np.ndarray
    rank: np.ndarray
    saliency: np.ndarray
    units: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.gate)


class PruneState:
    """Which units are alive, plus running widths per gate so that minimum checks and specs are cheap."""

    def __init__(self, layout: GroupLayout, alive: np.ndarray | None = None) -> None:
        self.layout = layout
        self.alive = np.ones(layout.num_units, dtype=bool) if alive is None else np.asarray(alive, dtype=bool).copy()
        if self.alive.shape != (layout.num_units,):
            raise PruneError(f"mask has {self.alive.size} entries, the layout has {layout.num_units} units")
        self.widths = np.bincount(layout.unit_gate[self.alive], minlength=len(layout.gates)).astype(np.int64)
        if (self.widths < layout.gate_min).any():
            raise PruneError("the mask leaves a gate below its minimum width")
        if ((np.array(layout.gate_sizes) - self.widths) % layout.gate_group).any():
            raise PruneError("the mask removes a partial group from some gate")

    @property
    def num_pruned(self) -> int:
        """Units removed so far."""
        return int((~self.alive).sum())

    def live_gates(self) -> np.ndarray:
        """Per gate, whether its sub-layer is still there (EMB and the layer gates themselves: always)."""
        layer = self.layout.gate_layer
        return np.where(layer >= 0, self.widths[np.maximum(layer, 0)] > 0, True)

    def removable_groups(self) -> np.ndarray:
        """Per gate, how many more groups may be removed before it reaches its minimum (none for the gates of a
        removed sub-layer, none for the last attention left, and none for a Swin block's last sub-layer)."""
        lay = self.layout
        count = np.maximum(0, (self.widths - lay.gate_min) // lay.gate_group)
        count[~self.live_gates()] = 0
        attn = lay.gates_of(GroupKind.ATTN_LAYER)
        if attn.size and int(self.widths[attn].sum()) <= 1:
            count[attn] = 0
        if lay.is_swin:  # a Swin block keeps its last sub-layer
            sibling = lay.gate_sibling
            sibling_gone = np.where(sibling >= 0, self.widths[np.maximum(sibling, 0)] == 0, True)
            count[np.isin(lay.gate_kind, [KIND_CODES[k] for k in SUBLAYER_KINDS]) & sibling_gone] = 0
        return count

    def candidates(self, unit_scores: np.ndarray) -> Candidates:
        """Dynamic groups of every gate that can shrink: its alive units by ascending score (ties by index),
        ``group_size`` at a time, as many groups as its minimum allows."""
        lay = self.layout
        scores = np.asarray(unit_scores, dtype=np.float64)
        if scores.shape != (lay.num_units,):
            raise PruneError(f"{scores.size} unit scores for a layout of {lay.num_units} units")
        gates, ranks, sal, units = [], [], [], []
        for j, count in enumerate(self.removable_groups()):
            if count == 0:
                continue
            gate = lay.gates[j]
            idx = np.flatnonzero(self.alive[gate.offset:gate.offset + gate.width]) + gate.offset
            ordered = idx[np.lexsort((idx, scores[idx]))]
            size = int(lay.gate_group[j])
            for k in range(int(count)):
                members = ordered[k * size:(k + 1) * size]
                gates.append(j)
                ranks.append(k)
                sal.append(float(scores[members].sum()))
                units.append(members)
        return Candidates(np.array(gates, dtype=np.int64), np.array(ranks, dtype=np.int64),
                          np.array(sal, dtype=np.float64), tuple(units))

    def can_remove(self, units: np.ndarray) -> bool:
        """Whether ``units`` are one whole group of alive units of one gate that may still shrink."""
        units = np.asarray(units, dtype=np.int64)
        if units.size == 0 or not self.alive[units].all() or len(set(units.tolist())) != units.size:
            return False
        gate = self.layout.unit_gate[units]
        j = int(gate[0])
        return bool((gate == j).all() and units.size == self.layout.gate_group[j]
                    and self.removable_groups()[j] > 0)

    def remove(self, units: np.ndarray) -> None:
        units = np.asarray(units, dtype=np.int64)
        if not self.can_remove(units):
            names = ", ".join(self.layout.unit_name(int(u)) for u in units[:3])
            raise PruneError(f"units {names} cannot be removed as one group (pruned already, mixed gates, "
                             "not a whole group, or at the minimum)")
        self.alive[units] = False
        self.widths[int(self.layout.unit_gate[units[0]])] -= units.size

    def spec(self) -> ArchSpec | SwinSpec:
        """The architecture at the current widths (what the latency predictor is asked about)."""
        return self.layout.spec_at(self.widths)

    def keep_indices(self) -> KeepIndices | SwinKeep:
        """Kept units of every gate, for :func:`nvit.models.slice_model` (nothing of a removed sub-layer), or a
        :class:`~nvit.models.swin_slicing.SwinKeep` for a Swin."""
        lay = self.layout
        live = self.live_gates() & (self.widths > 0)
        by_gate = [tuple(int(u) for u in np.flatnonzero(self.alive[g.offset:g.offset + g.width])) if live[j] else ()
                   for j, g in enumerate(lay.gates)]
        kept = {(g.kind, g.block): by_gate[j] for j, g in enumerate(lay.gates) if g.kind is not GroupKind.EMB}
        blocks = tuple(BlockKeep(*(kept.get((k, i), ()) for k in BLOCK_KINDS)) for i in range(lay.spec.depth))
        if lay.is_swin:
            return SwinKeep(tuple(StageKeep(by_gate[j], stage_blocks)
                                  for j, stage_blocks in zip(lay.emb_gates, lay.per_stage(blocks), strict=True)))
        return KeepIndices(emb=by_gate[lay.emb_gates[0]], blocks=blocks)

    def block_specs(self) -> list[BlockSpec | None]:
        """Per block of the base architecture, its current widths (``None``: dropped)."""
        return self.layout.block_specs(self.widths)

    def apply(self, model: VisionTransformer | SwinTransformer) -> None:
        """Set the model's gates: 1 on alive units, 0 on pruned ones (gates enabled if needed)."""
        keep = self.keep_indices()
        if isinstance(keep, SwinKeep):
            apply_swin_keep(model, keep)
        else:
            apply_keep_as_gates(model, keep)
        self.layout.check_model(model)

    def removed_by_kind(self) -> dict[str, int]:
        """Units removed so far per type (``emb``, ``head``, ``qk``, ``v``, ``mlp``, and whole sub-layers
        ``attn_layer``, ``mlp_layer``); the widths of a removed sub-layer count under the layer only."""
        lay = self.layout
        removed = np.array(lay.gate_sizes) - self.widths
        return {k.value: int(removed[lay.gate_kind == KIND_CODES[k]].sum()) for k in GroupKind}


def widths_row(spec: ArchSpec | list[BlockSpec | None], embed_dim: int | None = None) -> dict[str, int]:
    """Flat per-block widths (``b0_heads``, ``b0_qk_dim``, ...) plus ``embed_dim``, for logs and reports; given
    the blocks of :meth:`PruneState.block_specs`, a removed sub-layer or dropped block logs width 0 under its
    original index, so every row of a run has the same columns."""
    if isinstance(spec, ArchSpec):
        blocks: list[BlockSpec | None] = list(spec.blocks)
        embed_dim = spec.embed_dim
    else:
        blocks = spec
    row = {"embed_dim": int(embed_dim or 0)}
    for i, b in enumerate(blocks):
        row.update({f"b{i}_{name}": getattr(b, name) if b is not None else 0
                    for name in ("heads", "qk_dim", "v_dim", "mlp_dim")})
    return row
