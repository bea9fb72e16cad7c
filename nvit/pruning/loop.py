"""The NViT pruning loop: train, and every ``interval`` steps remove the lowest-scoring groups globally.

Per training step: forward, user-supplied loss (CE, or CE + KD from the dense teacher), backward; in the
last ``saliency_window`` steps of each interval the gate gradients feed the saliency window; then the
optimizer steps (gates are never trained). At each pruning step the window's unit scores update their
moving average, groups are formed anew from them (:meth:`~nvit.pruning.state.PruneState.candidates`),
ranked (``I − η·ΔLat`` with η fixed at the first step, saliency alone, ``I − η·ΔFLOPs``, or the
latency-budgeted knapsack) and masked (gate 0) one at a time with the predicted latency recomputed after
each, until the step has removed ``pace`` of the starting latency — or the next target is crossed, so that
every variant lands just at its target. Crossing a target saves the sliced model as a variant — with a
measurer, only once the variant *measures* within its target (:mod:`nvit.pruning.measured`); the run
ends at the last (lowest) target. Widths never leave the latency table's measured grid
(:mod:`nvit.pruning.limits`). Checkpoints make the run resumable exactly (:mod:`nvit.pruning.runstate`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from nvit.data import epoch_seed
from nvit.lut.base import Predictor
from nvit.models.vit import VisionTransformer
from nvit.pruning import runstate
from nvit.pruning.config import PruneConfig
from nvit.pruning.groups import GroupLayout
from nvit.pruning.limits import pruning_layout
from nvit.pruning.measured import MeasuredTargets, TargetMeasurer
from nvit.pruning.remover import GroupRemover
from nvit.pruning.results import PruneResult, SavedVariant, StepReport, variant_dict, variant_from_dict
from nvit.pruning.state import widths_row
from nvit.pruning.targets import ResolvedTarget, resolve_targets
from nvit.pruning.variants import VariantWriter
from nvit.training.batches import BatchSource
from nvit.training.distill import ClassificationLoss, LossFn
from nvit.training.distributed import DistContext, all_reduce_scalars, barrier, current_context, wrap_ddp
from nvit.training.fit import StepResult, parameter_groups, train_step

log = logging.getLogger(__name__)


def prune(
    model: VisionTransformer,
    *,
    config: PruneConfig,
    predictor: Predictor,
    data: BatchSource,
    out_dir: str | os.PathLike[str],
    loss_fn: LossFn | None = None,
    resume: bool = False,
    provenance: Mapping[str, Any] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    device: torch.device | str | None = None,
    distributed: DistContext | None = None,
    measurer: TargetMeasurer | None = None,
) -> PruneResult:
    """Prune ``model`` (dense or a variant) until its predicted latency meets every target in ``config``.

    ``loss_fn`` is a :class:`nvit.training.distill.LossFn` (default: cross-entropy; pass a
    :class:`~nvit.training.distill.DistillationLoss` for CE + KD from the dense teacher).
    ``provenance`` (base model, LUT identity...) is stored in every variant's ``arch.json``. Targets are
    checked before any work. With ``resume``, ``out_dir`` must hold a checkpoint of the same config.

    Under ``torchrun`` (``distributed``, default: the joined process group) every rank runs this with its
    shard of the data (:class:`~nvit.training.batches.StepBatches` with ``rank``/``world_size``); the model is
    wrapped in DDP after its gates are created, so gate gradients (hence saliency) and weight gradients are
    averaged over ranks and every rank takes the same pruning decisions; logged loss and accuracy are
    reduced over ranks; only rank 0 writes files.

    With a ``measurer`` each variant is timed where it crosses its target and saved only when its measured
    latency meets it (:mod:`nvit.pruning.measured`; rank 0 measures, every rank follows its decision).
    """
    layout = pruning_layout(model.spec, config, predictor)
    targets = resolve_targets(config.targets, predictor, layout)
    out = Path(out_dir)
    has_state = runstate.check_out_dir(out, resume)
    run = _Run(model, layout, targets, config, predictor, out, provenance or {}, device,
               distributed or current_context(), measurer)
    if has_state:
        run.restore()
    if not run.done:
        run.train(data, loss_fn or ClassificationLoss(), on_step)
    return run.result()


class _Run:
    """One run: the training loop, its step log, its checkpoint and its result. The pruning step is a
    :class:`~nvit.pruning.remover.GroupRemover`, the variants a :class:`~nvit.pruning.variants.VariantWriter`."""

    def __init__(self, model: VisionTransformer, layout: GroupLayout, targets: tuple[ResolvedTarget, ...],
                 config: PruneConfig, predictor: Predictor, out: Path, provenance: Mapping[str, Any],
                 device: torch.device | str | None, ctx: DistContext, measurer: TargetMeasurer | None = None
                 ) -> None:
        self.model, self.layout, self.targets, self.config = model, layout, targets, config
        self.predictor, self.out, self.provenance = predictor, out, dict(provenance)
        self.ctx = ctx
        if ctx.is_distributed:
            self.device = ctx.device
        else:
            self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.base_arch = model.spec.to_dict()
        self.dense_ms = predictor.predict_ms(layout.spec)
        self.min_ms = predictor.predict_ms(layout.minimal_spec())
        model.to(self.device)
        if not model.gate_parameters():
            model.enable_gates()
        self.remover = GroupRemover(layout, config, predictor, self.dense_ms)
        self.remover.state.apply(model)
        for g in model.gate_parameters():
            g.requires_grad_(True)
        self.train_model = wrap_ddp(model, ctx) if ctx.is_distributed else model  # gates exist before DDP
        self.optimizer = _optimizer(model, config)
        self.step = 0
        self.saved: list[SavedVariant] = []
        self.rows: list[dict[str, Any]] = []
        self.done = False
        broadcast = all_reduce_scalars if ctx.is_distributed else list  # others add 0 to rank 0's figures
        self.measured = MeasuredTargets(measurer, broadcast=broadcast, is_main=ctx.is_main)
        self.writer = VariantWriter(out, self.provenance, config, layout, self.dense_ms, self.min_ms, self.measured,
                                    ctx.is_main)

    # ---- persistence ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "base_arch": self.base_arch, "step": self.step, "done": self.done,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            **self.remover.state_dict(), "saved": [variant_dict(v) for v in self.saved],
            "measured": self.measured.state_dict(),
        }

    def checkpoint(self) -> None:
        if self.ctx.is_main:
            runstate.save_state(self.out, self._state(), self.rows)

    def restore(self) -> None:
        st = runstate.load_state(self.out)
        diff = runstate.config_mismatch(st["config"], self.config.to_dict())
        if diff:
            raise runstate.ResumeError(f"cannot resume {self.out}: the config differs ({diff})")
        if st["base_arch"] != self.base_arch:
            raise runstate.ResumeError(f"cannot resume {self.out}: it was started from another architecture")
        self.remover.load_state_dict(st)
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.done = int(st["step"]), bool(st["done"])
        self.saved = [variant_from_dict(v) for v in st["saved"]]
        self.measured.load_state_dict(st.get("measured"))
        self.rows = runstate.read_log(self.out / runstate.LOG_FILE, self.step)
        log.info("resuming %s at step %d (%d groups pruned)", self.out, self.step, self.remover.state.num_pruned)

    # ---- training ------------------------------------------------------------------------------
    def pending(self) -> list[ResolvedTarget]:
        done = {v.label for v in self.saved}
        return [t for t in self.targets if t.label not in done]

    def train(self, data: BatchSource, loss_fn: LossFn, on_step: Callable[[StepReport], None] | None) -> None:
        cfg, model = self.config, self.model
        gates = model.gate_parameters()
        batches = data.batches(self.step)
        while self.pending():
            torch.manual_seed(epoch_seed(cfg.seed, self.step, self.ctx.rank))  # augmentation: f(seed, step, rank)
            images, labels = next(batches)
            for g in gates:  # gates are not in the optimizer, so their gradients are cleared here
                g.grad = None
            in_window = self.step % cfg.interval >= cfg.interval - cfg.window
            hook = (lambda: self.remover.saliency.add(model)) if in_window else None
            stats = self.reduced(train_step(self.train_model, images, labels, self.optimizer, loss_fn,
                                            after_backward=hook))
            pruned_now, eta, prune_ms, saved = 0, math.nan, math.nan, None
            if (self.step + 1) % cfg.interval == 0:
                started = time.perf_counter()
                pruned_now, eta = self.prune_step()
                prune_ms = (time.perf_counter() - started) * 1e3
                crossed = self.writer.save_crossed(self.pending(), self.remover, self.model, self.step)
                self.saved += crossed
                saved = ",".join(v.label for v in crossed) or None
            report = self.record(stats, pruned_now, eta, prune_ms, saved)
            self.step += 1
            if not self.pending():
                self.done = True
            if self.done or self.step % cfg.checkpoint_interval == 0:
                self.checkpoint()
            if on_step is not None and self.ctx.is_main:
                on_step(report)

    def reduced(self, stats: StepResult) -> StepResult:
        """Loss, CE, KD and accuracy over every rank's samples."""
        if not self.ctx.is_distributed:
            return stats
        n = stats.count
        loss, ce, kd, correct, count = all_reduce_scalars([stats.loss * n, stats.ce * n, stats.kd * n,
                                                           stats.correct, n])
        return StepResult(loss / count, ce / count, kd / count, int(correct), int(count), stats.lr)

    def prune_step(self) -> tuple[int, float]:
        """Remove groups worth ``pace`` of the starting latency (or up to the next target); (groups, η)."""
        remover = self.remover
        goal_ms = max(self.measured.goal_ms(self.pending()[0].latency_ms, self.min_ms),
                      remover.latency_ms - self.config.pace * self.dense_ms)
        removed, eta = remover.remove_until(goal_ms)
        remover.state.apply(self.model)
        log.info("step %d: pruned %d groups, predicted %.4g ms (eta %.3g)", self.step, removed, remover.latency_ms,
                 eta)
        return removed, eta

    def record(self, stats: StepResult, pruned_now: int, eta: float, prune_ms: float, saved: str | None
               ) -> StepReport:
        pending = self.pending()
        next_ms = pending[0].latency_ms if pending else None
        span = self.dense_ms - self.targets[-1].latency_ms
        latency_ms, state, groups = self.remover.latency_ms, self.remover.state, self.remover.groups_removed
        progress = min(1.0, max(0.0, (self.dense_ms - latency_ms) / span))
        loss, accuracy = stats.loss, stats.correct / max(stats.count, 1)
        self.rows.append({
            "step": self.step, "loss": loss, "ce": stats.ce, "kd": stats.kd, "accuracy": accuracy,
            "lr": stats.lr, "predicted_latency_ms": latency_ms,
            "next_target_ms": math.nan if next_ms is None else next_ms, "pruned_groups": groups,
            "pruned_units": state.num_pruned, "pruned_now": pruned_now, "eta": eta,
            "prune_wall_ms": prune_ms, "saved": saved or "",
            **widths_row(state.block_specs(), int(state.widths[0])),
            **({f"s{s}_embed_dim": int(state.widths[j]) for s, j in enumerate(self.layout.emb_gates)}
               if self.layout.is_swin else {}),
            **{f"removed_{kind}": n for kind, n in state.removed_by_kind().items()},
        })
        return StepReport(self.step, loss, accuracy, latency_ms, next_ms, groups, pruned_now, progress, saved)

    def result(self) -> PruneResult:
        summary = {
            "out_dir": str(self.out), "dense_latency_ms": self.dense_ms, "min_latency_ms": self.min_ms,
            "steps": self.step, "config": self.config.to_dict(), "provenance": self.provenance,
            "variants": [variant_dict(v) for v in self.saved],
            "measured_targets": self.measured.summary() if self.measured.active else None,
        }
        if self.ctx.is_main:
            runstate.write_run_summary(self.out, summary)
        barrier()
        return PruneResult(str(self.out), self.dense_ms, self.min_ms, tuple(self.saved), self.step,
                           str(self.out / runstate.LOG_FILE),
                           self.measured.summary() if self.measured.active else None)


def _optimizer(model: VisionTransformer, config: PruneConfig) -> torch.optim.Optimizer:
    """AdamW over the weights (never the gates); no weight decay on norms, biases, tokens and positions."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
