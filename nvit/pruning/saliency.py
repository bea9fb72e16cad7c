"""Hessian-aware (Fisher) saliency of prunable units, from the gradients of the pruning gates.

For a unit s (a channel, neuron or head), ``I(s) = mean over a window of batches of (Σ w ∂L/∂w)²``, the sum
running over the parameters that produce or consume the unit's activation (DESIGN.md §3). Each gate
multiplies one unit's activation, so with the gate at 1 its gradient *is* that sum over the parameters that
produce or consume the gated activation linearly (:func:`parameter_unit_sums` spells the form out):

- HEAD h: the ``attn.proj`` columns of head h (equivalently its V rows and biases);
- QK c: the Q rows and biases of channel c in every head (equivalently the K rows: q·k is bilinear);
- V c: the ``attn.proj`` columns of channel c in every head (equivalently the V rows and biases);
- MLP u: the ``mlp.fc2`` column u (the gate sits after GELU);
- ATTN_LAYER / MLP_LAYER (a whole sub-layer): every weight and bias of ``attn.proj`` / ``mlp.fc2``, since
  the gate scales the branch's whole output. It is the same Hessian-aware estimate as the width groups',
  for the group "all of it at once": with the projection's bias at zero, its gate gradient is exactly the
  sum of the sub-layer's head (or neuron) gate gradients, and its score the square of that sum (the full
  Fisher form of removing them together, where the width groups' sum their units' diagonal terms);
- EMB c: patch-embedding row and bias, class/distillation token and position-embedding channel, every
  LayerNorm's weight and bias, every ``attn.proj`` and ``mlp.fc2`` row and bias — *plus* a term the
  parameter form lacks: the masked LayerNorm takes its mean and variance over live channels weighted by
  the gate, so the gate gradient also carries how removing the channel renormalises every other channel.

**EMB uses the gate gradient.** With the gate at 0 the masked model equals the sliced model exactly, so
``-∂L/∂gate`` is the first-order loss change of *removing* the channel, LayerNorm statistics included;
zeroing the parameters instead would leave a zero channel inside those statistics. The tests check the
gate form against the parameter form with the statistics term switched off, and that it is non-zero.

**Groups and steps.** A group's saliency is the sum of its units' (the diagonal Fisher form, as in NViT,
so that groups can be re-formed from any units at every step: :mod:`nvit.pruning.groups`). Across pruning
steps the unit scores are smoothed by an exponential moving average (:class:`ScoreAverage`; NViT: 0.9).

**Normalisation across types** (:class:`SaliencyNorm`). The gate form counts each unit's effect exactly
once, so all types share one scale (twice the Fisher estimate of the loss increase): ``none``, the
default. ``tensor-count`` divides each unit's score by the number of tensors its parameter-form sum visits
along the pruned dimension (:data:`TENSORS_SPANNED`; EMB: the depth). It is *not* NViT's rescaling, which
divides its parameter-form sums of w·g by 12 / 12 / 2 / 2 / 1 (EMB / HEAD / QK / V / MLP) *before*
squaring, to undo the double counting of a form that visits both sides of a unit; gate gradients need no
such correction, so nvit does not offer it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from nvit.errors import NvitError
from nvit.models.vit import VisionTransformer
from nvit.pruning.groups import KIND_CODES, GroupKind, GroupLayout

DEFAULT_EMA = 0.9  # NViT's momentum of the scores across pruning steps


class SaliencyError(NvitError):
    """A saliency could not be computed (missing gradients, or NaN/Inf for some unit)."""


class SaliencyNorm(enum.Enum):
    NONE = "none"
    TENSOR_COUNT = "tensor-count"


#: Tensors one group spans along its pruned dimension (EMB: once per block, the NViT convention).
TENSORS_SPANNED: dict[GroupKind, str | int] = {
    GroupKind.EMB: "depth",
    GroupKind.HEAD: 4,  # Q, K and V rows of the fused qkv, and the proj columns
    GroupKind.QK: 2,  # Q and K rows
    GroupKind.V: 2,  # V rows and proj columns
    GroupKind.MLP: 2,  # fc1 row and fc2 column
    GroupKind.ATTN_LAYER: 2,  # proj weight and bias
    GroupKind.MLP_LAYER: 2,  # fc2 weight and bias
}


def kind_scales(norm: SaliencyNorm, depth: int) -> dict[GroupKind, float]:
    """The factor each structure type's saliency is multiplied by before ranking."""
    if norm is SaliencyNorm.NONE:
        return dict.fromkeys(GroupKind, 1.0)
    spanned = {k: depth if v == "depth" else int(v) for k, v in TENSORS_SPANNED.items()}
    return {k: 1.0 / n for k, n in spanned.items()}


def normalise(saliency: np.ndarray, layout: GroupLayout, norm: SaliencyNorm) -> np.ndarray:
    """Per-unit saliency with its type's factor from :func:`kind_scales` applied."""
    scales = kind_scales(norm, layout.spec.depth)
    per_code = np.array([scales[k] for k in sorted(scales, key=KIND_CODES.__getitem__)])
    return saliency * per_code[layout.unit_kind]


def _flat(values: torch.Tensor) -> torch.Tensor:
    return values.detach().to(device="cpu", dtype=torch.float64)


def gate_unit_sums(model: VisionTransformer, layout: GroupLayout) -> torch.Tensor:
    """Per unit, ``Σ w ∂L/∂w`` read from the gate gradients of the last backward pass."""
    gates = layout.check_model(model)
    if any(g.grad is None for g in gates):
        raise SaliencyError("gate gradients are missing: run a backward pass with gates enabled first")
    return _flat(torch.cat([g.grad.reshape(-1) for g in gates]))


def parameter_unit_sums(model: VisionTransformer, layout: GroupLayout) -> torch.Tensor:
    """The same sums from weight gradients (the explicit parameter form; EMB without the LN-statistics term).

    Slower than :func:`gate_unit_sums`; it documents and tests what the gate gradients compute.
    """
    layout.check_model(model)
    gate_ids = {id(g) for g in model.gate_parameters()}
    wg: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if id(p) not in gate_ids:
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            wg[name] = (p.detach() * grad).to(device="cpu", dtype=torch.float64)

    emb = wg["patch_embed.proj.weight"].sum((1, 2, 3)) + wg["patch_embed.proj.bias"]
    for token in ("cls_token", "dist_token", "pos_embed"):
        if token in wg:
            emb = emb + wg[token].sum((0, 1))
    parts: list[torch.Tensor] = []
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        layers: list[torch.Tensor] = []
        if block.attn is not None:
            for name in ("norm1.weight", "norm1.bias", "attn.proj.bias"):
                emb = emb + wg[p + name]
            emb = emb + wg[p + "attn.proj.weight"].sum(1)
            a = block.attn
            q_rows = (wg[p + "attn.qkv.weight"].sum(1) + wg[p + "attn.qkv.bias"])[: a.heads * a.qk_dim]
            proj_cols = wg[p + "attn.proj.weight"].sum(0).view(a.heads, a.v_dim)
            parts += [proj_cols.sum(1), q_rows.view(a.heads, a.qk_dim).sum(0), proj_cols.sum(0)]
            layers.append((wg[p + "attn.proj.weight"].sum() + wg[p + "attn.proj.bias"].sum()).reshape(1))
        if block.mlp is not None:
            for name in ("norm2.weight", "norm2.bias", "mlp.fc2.bias"):
                emb = emb + wg[p + name]
            emb = emb + wg[p + "mlp.fc2.weight"].sum(1)
            parts.append(wg[p + "mlp.fc2.weight"].sum(0))
            layers.append((wg[p + "mlp.fc2.weight"].sum() + wg[p + "mlp.fc2.bias"].sum()).reshape(1))
        parts += layers
    emb = emb + wg["norm.weight"] + wg["norm.bias"]
    return _flat(torch.cat([emb, *parts]))


class SaliencyAccumulator:
    """Mean of squared unit sums over a window of batches; NaN/Inf is an error naming the unit."""

    def __init__(self, layout: GroupLayout) -> None:
        self.layout = layout
        self.reset()

    def reset(self) -> None:
        self._sum = np.zeros(self.layout.num_units, dtype=np.float64)
        self.count = 0

    def add_sums(self, sums: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(sums.numpy() if isinstance(sums, torch.Tensor) else sums, dtype=np.float64)
        _check_finite(values, self.layout, f"batch {self.count + 1} of the saliency window")
        self._sum += values * values
        self.count += 1

    def add(self, model: VisionTransformer) -> None:
        """Accumulate the current gate gradients (call after ``backward``, before zeroing gradients)."""
        self.add_sums(gate_unit_sums(model, self.layout))

    def mean(self, all_reduce: Callable[[torch.Tensor], Any] | None = None) -> np.ndarray:
        """``I`` per unit. ``all_reduce`` (an in-place SUM over processes) combines data-parallel windows."""
        total = torch.from_numpy(np.append(self._sum, float(self.count)))
        if all_reduce is not None:
            all_reduce(total)
        count = float(total[-1])
        if count <= 0:
            raise SaliencyError("no batches were accumulated into the saliency window")
        result = total[:-1].numpy() / count
        _check_finite(result, self.layout, "the saliency window")
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"sum": torch.from_numpy(self._sum.copy()), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = state["sum"].numpy().astype(np.float64)
        if values.shape != self._sum.shape:
            raise SaliencyError("saved saliency sums do not match the unit layout")
        self._sum, self.count = values.copy(), int(state["count"])


class ScoreAverage:
    """Unit scores smoothed across pruning steps: ``avg ← m·avg + (1 − m)·window`` (the first window as is).

    ``momentum`` 0 keeps only the latest window. Pruned units keep their last value; they are never ranked.
    """

    def __init__(self, layout: GroupLayout, momentum: float = DEFAULT_EMA) -> None:
        if not 0.0 <= momentum < 1.0:
            raise SaliencyError(f"the score momentum must be in [0, 1), got {momentum}")
        self.layout, self.momentum = layout, momentum
        self.value: np.ndarray | None = None

    def update(self, window: np.ndarray) -> np.ndarray:
        window = np.asarray(window, dtype=np.float64)
        if window.shape != (self.layout.num_units,):
            raise SaliencyError(f"{window.size} unit scores for a layout of {self.layout.num_units} units")
        self.value = window.copy() if self.value is None else self.momentum * self.value + (1 - self.momentum) * window
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": None if self.value is None else torch.from_numpy(self.value.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state["value"]
        self.value = None if value is None else value.numpy().astype(np.float64).copy()
        if self.value is not None and self.value.shape != (self.layout.num_units,):
            raise SaliencyError("saved unit scores do not match the unit layout")


def _check_finite(values: np.ndarray, layout: GroupLayout, where: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        first = layout.unit_name(int(bad[0]))
        more = f" and {bad.size - 1} other unit(s)" if bad.size > 1 else ""
        value = "nan" if math.isnan(values[bad[0]]) else "inf"
        raise SaliencyError(f"saliency of {first} is {value} in {where}{more}; check the loss and learning rate")
