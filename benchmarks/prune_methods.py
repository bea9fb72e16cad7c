"""The benchmark's one-shot baselines and training helpers (used by prune_fashion.py).

Baselines prune the base at once to a target *predicted* latency, with the same groups, minimums and grid
as ``nvit prune`` (:func:`nvit.pruning.limits.pruning_layout`), then fine-tune like every other method:

- ``uniform``: every width (embed, heads, QK, V, MLP) scaled by one factor, the largest that meets the
  target (the units kept in each gate are those of largest mean |w|);
- ``l1``: global greedy removal of the group of smallest mean |w| (groups formed from the units of smallest
  mean |w| of each gate, re-formed after every removal), until the target is met;
- ``random``: the same greedy removal in a seeded random unit order;
- ``depth``: whole blocks, least salient first (a block's saliency: the Fisher estimate of switching off both
  of its residual branches at once, ``mean over batches of (∂L/∂g_attn + ∂L/∂g_mlp)²``), until the table
  predicts the target; one block always stays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nvit.lut.base import Predictor
from nvit.models.vit import VisionTransformer
from nvit.pruning.groups import GroupKind, GroupLayout
from nvit.pruning.state import PruneState
from nvit.training.batches import StepBatches
from nvit.training.fit import lr_factor, parameter_groups, train_step

ALPHA_STEP = 0.01  # resolution of the uniform width factor


def l1_unit_scores(model: VisionTransformer, layout: GroupLayout) -> np.ndarray:
    """Mean |w| over every parameter a unit owns (both sides: what produces and what consumes it)."""
    def per_unit(f: Any) -> torch.Tensor:
        p = {k: f(v.detach().double()) for k, v in model.named_parameters() if "gate" not in k}
        emb = p["patch_embed.proj.weight"].sum((1, 2, 3)) + p["patch_embed.proj.bias"] + p["pos_embed"].sum((0, 1))
        for name in ("cls_token", "dist_token"):
            emb = emb + p[name].sum((0, 1)) if name in p else emb
        parts = []
        for i, blk in enumerate(model.blocks):
            q = f"blocks.{i}."
            layers = []
            if blk.attn is not None:
                a = blk.attn
                h, dq, dv = a.heads, a.qk_dim, a.v_dim
                emb = emb + sum(p[q + n] for n in ("norm1.weight", "norm1.bias", "attn.proj.bias"))
                emb = emb + p[q + "attn.qkv.weight"].sum(0) + p[q + "attn.proj.weight"].sum(1)
                rows = p[q + "attn.qkv.weight"].sum(1) + p[q + "attn.qkv.bias"]
                qr, kr = rows[: h * dq].view(h, dq), rows[h * dq : 2 * h * dq].view(h, dq)
                vr = rows[2 * h * dq :].view(h, dv)
                proj = p[q + "attn.proj.weight"].sum(0).view(h, dv)
                parts += [qr.sum(1) + kr.sum(1) + vr.sum(1) + proj.sum(1), qr.sum(0) + kr.sum(0),
                          vr.sum(0) + proj.sum(0)]
                layers.append((p[q + "attn.proj.weight"].sum() + p[q + "attn.proj.bias"].sum()).reshape(1))
            if blk.mlp is not None:
                emb = emb + sum(p[q + n] for n in ("norm2.weight", "norm2.bias", "mlp.fc2.bias"))
                emb = emb + p[q + "mlp.fc1.weight"].sum(0) + p[q + "mlp.fc2.weight"].sum(1)
                parts.append(p[q + "mlp.fc1.weight"].sum(1) + p[q + "mlp.fc1.bias"] + p[q + "mlp.fc2.weight"].sum(0))
                layers.append((p[q + "mlp.fc2.weight"].sum() + p[q + "mlp.fc2.bias"].sum()).reshape(1))
            parts += layers  # a whole sub-layer: its output projection's weights
        emb = emb + p["norm.weight"] + p["norm.bias"] + p["head.weight"].sum(0)
        if "head_dist.weight" in p:
            emb = emb + p["head_dist.weight"].sum(0)
        return torch.cat([emb, *parts])

    scores = (per_unit(torch.abs) / per_unit(torch.ones_like)).numpy()
    if scores.shape != (layout.num_units,):
        raise ValueError(f"{scores.size} unit scores for a layout of {layout.num_units} units")
    return scores


def greedy_to_target(layout: GroupLayout, unit_scores: np.ndarray, predictor: Predictor, target_ms: float
                     ) -> PruneState:
    """Remove the group of smallest mean unit score (groups re-formed after each removal) until the
    predicted latency meets the target."""
    state = PruneState(layout)
    while predictor.predict_ms(state.spec()) > target_ms:
        cand = state.candidates(unit_scores)
        if len(cand) == 0:
            raise RuntimeError("every gate is at its minimum and the target is not met")
        mean = cand.saliency / np.array([len(u) for u in cand.units])
        state.remove(cand.units[int(np.lexsort((cand.rank, cand.gate, mean))[0])])
    return state


def uniform_to_target(layout: GroupLayout, unit_scores: np.ndarray, predictor: Predictor, target_ms: float
                      ) -> PruneState:
    """The largest uniform width factor that meets the target; within each gate the highest-scoring units stay."""
    sizes, group, minimum = np.array(layout.gate_sizes), layout.gate_group, layout.gate_min
    for alpha in np.arange(1.0, 0.0, -ALPHA_STEP):
        keep = np.clip(group * np.round(sizes * alpha / group), minimum, sizes).astype(int)
        alive = np.zeros(layout.num_units, dtype=bool)
        for j, gate in enumerate(layout.gates):
            units = np.arange(gate.offset, gate.offset + gate.width)
            alive[units[np.argsort(-unit_scores[units], kind="stable")[: keep[j]]]] = True
        state = PruneState(layout, alive)
        if predictor.predict_ms(state.spec()) <= target_ms:
            return state
    raise RuntimeError("no uniform width factor meets the target")


def block_saliency(model: VisionTransformer, layout: GroupLayout, batches: Any, loss: Any, *, count: int
                   ) -> np.ndarray:
    """Per block, ``mean over count batches of (∂L/∂g_attn + ∂L/∂g_mlp)²`` at the dense model (gates at 1)."""
    from nvit.pruning.saliency import gate_unit_sums

    model.enable_gates()
    total = np.zeros(layout.spec.depth)
    model.train()
    for _ in range(count):
        images, labels = next(batches)
        model.zero_grad(set_to_none=True)
        loss(images, model(images), labels).total.backward()
        sums = gate_unit_sums(model, layout).numpy()
        for i in range(layout.spec.depth):
            branch = [sums[layout.units_of(j)[0]] for k in (GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER)
                      for j in layout.gates_of(k, i)]
            total[i] += float(np.sum(branch)) ** 2
    model.disable_gates()
    model.zero_grad(set_to_none=True)
    return total / count


def depth_floor_spec(layout: GroupLayout) -> Any:
    """The shallowest architecture depth-only pruning reaches: the first block alone, whole."""
    state = PruneState(layout)
    for block in range(1, layout.spec.depth):
        for k in (GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER):
            for j in layout.gates_of(k, block):
                state.remove(layout.units_of(j))
    return state.spec()


def reachable_ratios(layout: GroupLayout, predictor: Predictor, ratios: tuple[float, ...], *,
                     whole_blocks: bool = False) -> tuple[float, ...]:
    """The target ratios of the dense predicted latency that ``layout``'s smallest architecture reaches (with
    ``whole_blocks``: the one block depth-only pruning keeps)."""
    floor = predictor.predict_ms(depth_floor_spec(layout) if whole_blocks else layout.minimal_spec())
    dense = predictor.predict_ms(layout.spec)
    return tuple(r for r in ratios if r * dense >= floor)


def depth_variants(ctx: Any, layout: GroupLayout, ratios: tuple[float, ...], seed: int
                   ) -> tuple[list[tuple[float, Any, int]], list[dict[str, Any]]]:
    """``depth`` one shot to each ratio from the base of ``ctx`` (a ``prune_fashion.Context``): the sliced
    variants (no pruning steps) and the block saliencies they were chosen by."""
    from nvit.models import load_variant, slice_model

    s = ctx.s
    batches = StepBatches(ctx.train, batch_size=s.batch_size, seed=seed).batches(0)
    scores = block_saliency(load_variant(ctx.base_dir), layout, batches, ctx.loss(), count=s.interval)
    dense_ms = ctx.predictor.predict_ms(layout.spec)
    out = []
    for ratio in ratios:
        model = load_variant(ctx.base_dir)
        depth_to_target(layout, scores, ctx.predictor, ratio * dense_ms).apply(model)
        out.append((ratio, slice_model(model), 0))
    return out, [{"block_saliency": scores.tolist()}]


def depth_to_target(layout: GroupLayout, block_scores: np.ndarray, predictor: Predictor, target_ms: float
                    ) -> PruneState:
    """Drop whole blocks, least salient first, until the predicted latency meets the target (``layout`` must
    allow removing both sub-layers)."""
    state = PruneState(layout)
    for block in np.argsort(block_scores, kind="stable"):
        if predictor.predict_ms(state.spec()) <= target_ms:
            return state
        layers = [layout.units_of(j) for k in (GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER)
                  for j in layout.gates_of(k, int(block))]
        if not all(state.can_remove(u) for u in layers):
            continue  # the last attention stays
        for units in layers:
            state.remove(units)
    if predictor.predict_ms(state.spec()) <= target_ms:
        return state
    raise RuntimeError("dropping every block but one does not meet the target")


def finetune(model: VisionTransformer, loss: Any, train_set: Any, *, steps: int, lr: float, batch_size: int,
             seed: int) -> float:
    """``steps`` AdamW steps with a cosine schedule to 1% of ``lr``; returns the last loss (nan for 0 steps)."""
    if steps <= 0:
        return float("nan")
    opt = torch.optim.AdamW(parameter_groups(model, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, total_steps=steps, warmup_steps=0, min_ratio=0.01))
    batches = StepBatches(train_set, batch_size=batch_size, seed=1000 + seed).batches(0)
    last = float("nan")
    for step in range(steps):
        torch.manual_seed(seed * 1_000_003 + step)  # augmentation: a function of (seed, step)
        images, labels = next(batches)
        last = train_step(model, images, labels, opt, loss, scheduler=sched).loss
    return last
