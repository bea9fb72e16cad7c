"""Training and evaluation helpers shared by ``nvit train``, ``nvit finetune`` and the pruning loop.

- :func:`train_step`: forward, loss (any :class:`~nvit.training.distill.LossFn`), backward, optional hook
  (the pruning engine reads gate gradients there), clip, optimizer and scheduler step.
- :func:`train_epoch` / :func:`evaluate`: metrics summed over DDP ranks when the loader is sharded.
- :func:`build_optimizer` (AdamW, no decay on biases, norms and tokens; gates never optimised) and
  :func:`build_scheduler` (linear warm-up, then cosine to ``min_lr``), both per optimizer step.
- :func:`fit`: the epoch loop with progress callbacks and an atomic checkpoint after every epoch, from
  which ``resume`` continues with exactly the losses an uninterrupted run would have produced (order and
  augmentation depend only on ``(seed, epoch, rank)``, see :func:`nvit.data.start_epoch`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from nvit.data import ShardedSampler, start_epoch
from nvit.training.checkpoint import (
    TrainError,
    TrainState,
    load_checkpoint,
    run_lock,
    save_checkpoint,
)
from nvit.training.distill import LossFn, StudentOutput
from nvit.training.distributed import all_reduce_scalars, unwrap

log = logging.getLogger(__name__)

__all__ = [
    "EpochStats", "FitResult", "Progress", "StepResult", "TrainConfig",
    "build_optimizer", "build_scheduler", "evaluate", "fit", "lr_factor", "parameter_groups",
    "save_history", "train_epoch", "train_step",
]

#: Parameters never decayed (besides every bias and norm), by their last name: ViT's tokens and positions,
#: Swin's relative-position bias tables.
_NO_DECAY_NAMES = ("cls_token", "dist_token", "pos_embed", "relative_position_bias_table")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``batch_size`` is per process, learning rates are per optimizer step."""

    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip_norm: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainError(f"epochs and batch size must be at least 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise TrainError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise TrainError("weight decay and warm-up epochs must be >= 0")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise TrainError(f"grad_clip_norm must be positive or None, got {self.grad_clip_norm}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"unknown training key(s): {', '.join(unknown)}")
        return cls(**dict(data))


# ---- optimizer and schedule -----------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight matrices decay; biases, norm scales, tokens and position embedding do not.

    Gate parameters (pruning masks) are left out entirely: they receive gradients but are never stepped.
    """
    bare = unwrap(model)
    gates = {id(g) for g in getattr(bare, "gate_parameters", list)()}
    decay, no_decay = [], []
    for name, param in bare.named_parameters():
        if id(param) in gates or not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2)
    )


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from 1/warmup, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    min_ratio = config.min_lr / config.lr

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, warmup_steps=warmup, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- steps and epochs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    loss: float
    ce: float
    kd: float
    correct: int
    count: int
    lr: float


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip_norm: float | None = None,
    after_backward: Callable[[], None] | None = None,
) -> StepResult:
    """One optimisation step on one batch (moved to the model's device). Non-finite loss is an error."""
    device = _device_of(model)
    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outputs: StudentOutput = model(images)
    parts = loss_fn(images, outputs, targets)
    if not torch.isfinite(parts.total.detach()):
        raise TrainError(f"the training loss is {float(parts.total)}; lower the learning rate")
    parts.total.backward()
    if after_backward is not None:
        after_backward()
    if grad_clip_norm is not None:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip_norm)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    correct = int((parts.logits.argmax(dim=-1) == targets).sum())
    return StepResult(float(parts.total.detach()), parts.ce, parts.kd, correct, len(targets), lr)


@dataclass(frozen=True)
class Progress:
    """What a progress callback sees after each step (``val_top1`` is set once, at the end of an epoch)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    lr: float
    val_top1: float | None = None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class EpochStats:
    """Per-epoch metrics averaged over all ranks; ``losses`` are this rank's per-step losses."""

    epoch: int
    loss: float
    train_top1: float
    val_top1: float | None
    lr: float
    seconds: float
    losses: tuple[float, ...] = ()


def _is_sharded(loader: DataLoader) -> bool:
    sampler = loader.sampler
    return isinstance(sampler, ShardedSampler) and sampler.world_size > 1


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    epoch: int,
    config: TrainConfig,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: ProgressFn | None = None,
) -> EpochStats:
    """One pass over this rank's shard; loss and accuracy are weighted means over every rank's samples."""
    start_epoch(loader, epoch, seed=config.seed)
    started = time.perf_counter()
    loss_sum, correct, count, lr = 0.0, 0, 0, config.lr
    losses = []
    steps = len(loader)
    for step, (images, targets) in enumerate(loader):
        result = train_step(
            model, images, targets, optimizer, loss_fn, scheduler=scheduler, grad_clip_norm=config.grad_clip_norm
        )
        losses.append(result.loss)
        loss_sum += result.loss * result.count
        correct += result.correct
        count += result.count
        lr = result.lr
        if on_step is not None:
            on_step(Progress(epoch, config.epochs, step + 1, steps, result.loss, result.lr))
    if _is_sharded(loader):
        loss_sum, correct, count = all_reduce_scalars([loss_sum, correct, count])
    seconds = time.perf_counter() - started
    return EpochStats(epoch, loss_sum / max(count, 1), correct / max(count, 1), None, lr, seconds, tuple(losses))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy as a fraction in [0, 1], over every rank's shard when the loader is sharded."""
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    device = _device_of(bare)
    correct = count = 0
    try:
        for images, targets in loader:
            logits = bare(images.to(device))
            correct += int((logits.argmax(dim=-1).cpu() == targets).sum())
            count += len(targets)
    finally:
        bare.train(was_training)
    if _is_sharded(loader):
        correct, count = all_reduce_scalars([correct, count])
    if count == 0:
        raise TrainError("the evaluation loader yielded no samples")
    return correct / count


def save_history(history: Sequence[EpochStats], path: str | os.PathLike[str]) -> None:
    """Per-epoch metrics as CSV (one row per epoch; top-1 as fractions), written atomically."""
    from nvit.fileio import atomic_write_text

    rows = [_stats_row(s) for s in history]
    columns = list(rows[0]) if rows else ["epoch"]
    cell = lambda row, c: str(int(row[c])) if c == "epoch" else repr(row[c])  # noqa: E731
    lines = [",".join(columns)] + [",".join(cell(row, c) for c in columns) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ---- the loop -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    history: tuple[EpochStats, ...]
    resumed_at_epoch: int
    val_top1: float | None


def _stats_row(stats: EpochStats) -> dict[str, float]:
    row = {k: v for k, v in asdict(stats).items() if k != "losses"}
    return {k: (float("nan") if v is None else float(v)) for k, v in row.items()}


def _from_row(row: Mapping[str, float]) -> EpochStats:
    val = row["val_top1"]
    return EpochStats(int(row["epoch"]), row["loss"], row["train_top1"], None if math.isnan(val) else val,
                      row["lr"], row["seconds"])


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    val_loader: DataLoader | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = True,
    extra: Mapping[str, Any] | None = None,
    on_step: ProgressFn | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """Train for ``config.epochs``, checkpointing after each epoch; ``resume`` continues a saved run.

    A checkpoint written with a different ``config`` or ``extra`` (e.g. another data set) is refused
    rather than silently mixed.
    """
    with run_lock(checkpoint_path):
        return _fit(model, train_loader, loss_fn, config, val_loader=val_loader, checkpoint_path=checkpoint_path,
                    resume=resume, extra=extra, on_step=on_step, on_epoch=on_epoch)


def _fit(
    model: nn.Module, train_loader: DataLoader, loss_fn: LossFn, config: TrainConfig, *,
    val_loader: DataLoader | None, checkpoint_path: str | os.PathLike[str] | None, resume: bool,
    extra: Mapping[str, Any] | None, on_step: ProgressFn | None, on_epoch: Callable[[EpochStats], None] | None,
) -> FitResult:
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    extra = dict(extra or {})
    history: list[EpochStats] = []
    first_epoch = 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
        state = load_checkpoint(checkpoint_path, model, optimizer, scheduler)
        if state.config != config.to_dict() or state.extra != extra:
            changed = sorted(k for k in {**state.config, **config.to_dict()}
                             if state.config.get(k) != config.to_dict().get(k))
            changed += sorted(k for k in {**state.extra, **extra} if state.extra.get(k) != extra.get(k))
            raise TrainError(f"{checkpoint_path} was written with other settings ({', '.join(changed)}); "
                             "rerun with the same settings, or restart from scratch (--restart)")
        first_epoch = state.epochs_done
        history = [_from_row(row) for row in state.history]
        log.info("resuming at epoch %d of %d from %s", first_epoch + 1, config.epochs, checkpoint_path)
    for epoch in range(first_epoch, config.epochs):
        stats = train_epoch(model, train_loader, optimizer, loss_fn, epoch=epoch, config=config,
                            scheduler=scheduler, on_step=on_step)
        if val_loader is not None:
            stats = replace(stats, val_top1=evaluate(model, val_loader))
        history.append(stats)
        log.info("epoch %d/%d: loss %.4f, train top-1 %.4f, val top-1 %s, %.1f s", epoch + 1, config.epochs,
                 stats.loss, stats.train_top1, stats.val_top1, stats.seconds)
        if checkpoint_path is not None:
            state = TrainState(epoch + 1, tuple(_stats_row(s) for s in history), config.to_dict(), extra)
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, state)
        if on_epoch is not None:
            on_epoch(stats)
    val_top1 = history[-1].val_top1 if history else None
    return FitResult(tuple(history), first_epoch, val_top1)


def top1(model: nn.Module, dataset: Any, *, batch_size: int = 256, rank: int | None = None,
         world_size: int | None = None) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode on a data set, on the model's device.

    Under torchrun every rank evaluates its shard and the counts are all-reduced, unless ``rank`` and
    ``world_size`` say otherwise (``rank=0, world_size=1``: the whole set here, with no collective)."""
    from nvit.data import build_loader

    loader = build_loader(dataset, batch_size=batch_size, train=False, rank=rank, world_size=world_size)
    return evaluate(model, loader)
