"""The NViT pruning loop: train, and every ``interval`` steps remove the lowest-scoring groups globally.

Per training step: forward, user-supplied loss (CE, or CE + KD from the dense teacher), backward; in the
last ``saliency_window`` steps of each interval the gate gradients feed the saliency window; then the
optimizer steps (gates are never trained). At each pruning step the window's unit scores update their
moving average, groups are formed anew from them (:meth:`~nvit.pruning.groups.PruneState.candidates`),
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvit import __version__
from nvit.arch import ArchSpec
from nvit.data import epoch_seed
from nvit.errors import TargetError
from nvit.lut.base import FlopsPredictor, Predictor
from nvit.models import save_variant, slice_model
from nvit.models.vit import VisionTransformer
from nvit.pruning import runstate
from nvit.pruning.config import PruneConfig, RankingMethod, Target, TargetKind
from nvit.pruning.groups import GroupLayout, PruneError, PruneState, widths_row
from nvit.pruning.knapsack import knapsack_order
from nvit.pruning.limits import check_within, grid_minimums, measured_grid, removable_sublayers
from nvit.pruning.measured import MeasuredTargets, TargetMeasurer
from nvit.pruning.regularizer import LatencyTradeoff, checked_deltas, gate_latency_deltas_ms, rank
from nvit.pruning.results import PruneResult, SavedVariant, StepReport, variant_dict, variant_from_dict
from nvit.pruning.saliency import SaliencyAccumulator, ScoreAverage, normalise
from nvit.training.batches import BatchSource
from nvit.training.distill import ClassificationLoss, LossFn
from nvit.training.distributed import DistContext, all_reduce_scalars, barrier, current_context, wrap_ddp
from nvit.training.fit import StepResult, parameter_groups, train_step

log = logging.getLogger(__name__)


def pruning_layout(spec: ArchSpec, config: PruneConfig, predictor: Predictor) -> GroupLayout:
    """The groups of ``spec`` with minimums raised to the table's smallest measured widths; a model outside
    the table's grid is refused (:mod:`nvit.pruning.limits`)."""
    grid = measured_grid(predictor)
    check_within(spec, grid)
    return GroupLayout(spec, group_size=config.group_size, minimums=grid_minimums(config.minimums(), grid),
                       removable=removable_sublayers(config, predictor))


@dataclass(frozen=True)
class ResolvedTarget:
    target: Target
    latency_ms: float

    @property
    def label(self) -> str:
        return self.target.label


def resolve_targets(
    targets: tuple[Target, ...], predictor: Predictor, layout: GroupLayout
) -> tuple[ResolvedTarget, ...]:
    """Targets in ms, highest first; unreachable ones are rejected with the smallest reachable latency."""
    start_ms = predictor.predict_ms(layout.spec)
    min_ms = predictor.predict_ms(layout.minimal_spec())
    out = []
    for t in targets:
        ms = t.value if t.kind is TargetKind.LATENCY_MS else t.value * start_ms
        if ms < min_ms:
            raise TargetError(
                f"target {t.label} ({ms:.4g} ms) is below the smallest reachable predicted latency {min_ms:.4g} ms "
                f"(every width at its minimum, the smallest the latency table measured or one group)"
            )
        if ms >= start_ms:
            raise TargetError(
                f"target {t.label} ({ms:.4g} ms) is not below the model's predicted latency {start_ms:.4g} ms"
            )
        out.append(ResolvedTarget(t, ms))
    return tuple(sorted(out, key=lambda r: -r.latency_ms))


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
        if model.emb_gate is None:
            model.enable_gates()
        self.state = PruneState(layout)
        self.state.apply(model)
        for g in model.gate_parameters():
            g.requires_grad_(True)
        self.train_model = wrap_ddp(model, ctx) if ctx.is_distributed else model  # gates exist before DDP
        self.optimizer = _optimizer(model, config)
        self.saliency = SaliencyAccumulator(layout)
        self.scores = ScoreAverage(layout, config.saliency_ema)
        self.tradeoff = LatencyTradeoff(config.latency_weight) if config.uses_latency_term else None
        # the FLOPs ranking prices groups by FLOPs in the units of the table's dense prediction
        self.rank_predictor = (FlopsPredictor(layout.spec, reference_ms=self.dense_ms)
                               if config.ranking is RankingMethod.FLOPS else predictor)
        self.groups_removed = 0
        self.step = 0
        self.latency_ms = self.dense_ms
        self.saved: list[SavedVariant] = []
        self.rows: list[dict[str, Any]] = []
        self.done = False
        broadcast = all_reduce_scalars if ctx.is_distributed else list  # others add 0 to rank 0's figures
        self.measured = MeasuredTargets(measurer, broadcast=broadcast, is_main=ctx.is_main)

    # ---- persistence ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "base_arch": self.base_arch, "step": self.step, "done": self.done,
            "alive": torch.from_numpy(self.state.alive.copy()), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "saliency": self.saliency.state_dict(),
            "scores": self.scores.state_dict(), "eta": None if self.tradeoff is None else self.tradeoff.eta,
            "groups_removed": self.groups_removed, "saved": [variant_dict(v) for v in self.saved],
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
        self.state = PruneState(self.layout, st["alive"].numpy())
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.saliency.load_state_dict(st["saliency"])
        self.scores.load_state_dict(st["scores"])
        if self.tradeoff is not None:
            self.tradeoff.eta = st["eta"]
        self.groups_removed = int(st["groups_removed"])
        self.step, self.done = int(st["step"]), bool(st["done"])
        self.saved = [variant_from_dict(v) for v in st["saved"]]
        self.measured.load_state_dict(st.get("measured"))
        self.rows = runstate.read_log(self.out / runstate.LOG_FILE, self.step)
        self.latency_ms = self.predictor.predict_ms(self.state.spec())
        log.info("resuming %s at step %d (%d groups pruned)", self.out, self.step, self.state.num_pruned)

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
            hook = (lambda: self.saliency.add(model)) if in_window else None
            stats = self.reduced(train_step(self.train_model, images, labels, self.optimizer, loss_fn,
                                            after_backward=hook))
            pruned_now, eta, prune_ms, saved = 0, math.nan, math.nan, None
            if (self.step + 1) % cfg.interval == 0:
                started = time.perf_counter()
                pruned_now, eta = self.prune_step()
                prune_ms = (time.perf_counter() - started) * 1e3
                saved = self.save_crossed()
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
        cfg, state, lay = self.config, self.state, self.layout
        window = self.saliency.mean()
        self.saliency.reset()
        scores = self.scores.update(normalise(window, lay, cfg.saliency_norm))
        cand = state.candidates(scores)
        if len(cand) == 0:
            raise PruneError("no group can be removed any more, yet a target is not met")
        goal_ms = max(self.measured.goal_ms(self.pending()[0].latency_ms, self.min_ms),
                      self.latency_ms - cfg.pace * self.dense_ms)
        if cfg.ranking is RankingMethod.KNAPSACK:
            deltas = checked_deltas(lay, cand, gate_latency_deltas_ms(lay, self.predictor, state.widths))
            order, eta = knapsack_order(cand, deltas, self.latency_ms - goal_ms), math.nan
        else:
            gate_d = (gate_latency_deltas_ms(lay, self.rank_predictor, state.widths) if cfg.uses_latency_term
                      else None)
            ranking = rank(lay, cand, delta_ms=gate_d, tradeoff=self.tradeoff)
            order, eta = ranking.order(), ranking.eta
        removed = 0
        for pos in order:
            units = cand.units[int(pos)]
            if not state.can_remove(units):
                continue
            state.remove(units)
            removed += 1
            self.latency_ms = self.predictor.predict_ms(state.spec())
            if self.latency_ms <= goal_ms:
                break
        state.apply(self.model)
        self.groups_removed += removed
        log.info("step %d: pruned %d groups, predicted %.4g ms (eta %.3g)", self.step, removed, self.latency_ms, eta)
        return removed, eta

    def save_crossed(self) -> str | None:
        labels = []
        for t in self.pending():
            if self.latency_ms > self.measured.goal_ms(t.latency_ms, self.min_ms):
                break
            sliced, measurement = slice_model(self.model).eval(), None
            if self.measured.active:
                decision = self.measured.measure(t.label, t.latency_ms, self.latency_ms, self.min_ms, self.step,
                                                 self.state.spec(), sliced)
                if not decision.save:
                    break
                measurement = decision.record
            self.saved.append(self.save_variant(t, sliced, measurement))
            labels.append(t.label)
        return ",".join(labels) or None

    def save_variant(self, target: ResolvedTarget, sliced: VisionTransformer,
                     measurement: dict[str, Any] | None = None) -> SavedVariant:
        spec = self.state.spec()
        if sliced.spec.to_dict() != spec.to_dict():
            raise PruneError("the sliced model's widths differ from the pruning mask (internal error)")
        folder = self.out / target.label
        prov = {
            **self.provenance,
            "target": {**target.target.to_dict(), "latency_ms": target.latency_ms},
            "predicted_latency_ms": self.latency_ms,
            "dense_predicted_latency_ms": self.dense_ms,
            "step": self.step,
            "pruned_groups": self.groups_removed,
            "pruned_units": self.state.num_pruned,
            "prune_config": self.config.to_dict(),
            "removable_sublayers": sorted(k.value for k in self.layout.removable),
            "removed_sublayers": spec.removed_sublayers,
            "dropped_blocks": [i for i, b in enumerate(self.state.block_specs()) if b is None],
            "nvit_version": __version__,
        }
        if measurement is not None:
            prov["measured_latency"] = {**measurement, "correction": self.measured.correction}
        if self.ctx.is_main:
            save_variant(sliced, folder, prov)
        log.info("saved %s: predicted %.4g ms <= target %.4g ms", folder, self.latency_ms, target.latency_ms)
        return SavedVariant(target.label, str(folder), target.latency_ms, self.latency_ms, self.step, spec,
                            None if measurement is None else measurement["corrected_ms"],
                            None if measurement is None else measurement["met"])

    def record(self, stats: StepResult, pruned_now: int, eta: float, prune_ms: float, saved: str | None
               ) -> StepReport:
        pending = self.pending()
        next_ms = pending[0].latency_ms if pending else None
        span = self.dense_ms - self.targets[-1].latency_ms
        progress = min(1.0, max(0.0, (self.dense_ms - self.latency_ms) / span))
        loss, accuracy = stats.loss, stats.correct / max(stats.count, 1)
        self.rows.append({
            "step": self.step, "loss": loss, "ce": stats.ce, "kd": stats.kd, "accuracy": accuracy,
            "lr": stats.lr, "predicted_latency_ms": self.latency_ms,
            "next_target_ms": math.nan if next_ms is None else next_ms, "pruned_groups": self.groups_removed,
            "pruned_units": self.state.num_pruned, "pruned_now": pruned_now, "eta": eta,
            "prune_wall_ms": prune_ms, "saved": saved or "",
            **widths_row(self.state.block_specs(), int(self.state.widths[0])),
            **{f"removed_{kind}": n for kind, n in self.state.removed_by_kind().items()},
        })
        return StepReport(self.step, loss, accuracy, self.latency_ms, next_ms, self.groups_removed, pruned_now,
                          progress, saved)

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
