"""Knowledge distillation from a dense teacher: CE on labels plus a KD term (DESIGN.md §3, DeiT).

With weight α, temperature τ, student logits s, teacher logits t and labels y:

- SOFT: ``(1 − α)·CE(s, y) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`` (KL averaged over the batch; τ²
  keeps the gradient scale independent of τ).
- HARD: ``(1 − α)·CE(s, y) + α·CE(s, argmax t)``.

A distilled student (DeiT's distillation token) returns ``(cls_logits, dist_logits)`` in train mode: the
class head takes the CE term and the distillation head takes the KD term. ``DistillMode.AUTO`` picks HARD
for such students (DeiT's hard distillation, α = ½) and SOFT otherwise. α = 0 is plain cross-entropy.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nvit.errors import NvitError


class DistillError(NvitError):
    """A distillation setting is invalid or the student/teacher outputs do not match."""


class DistillMode(str, enum.Enum):
    AUTO = "auto"
    SOFT = "soft"
    HARD = "hard"


StudentOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DistillConfig:
    """Strict distillation settings; :meth:`from_dict` rejects unknown keys."""

    weight: float = 0.5
    temperature: float = 1.0
    mode: DistillMode = DistillMode.AUTO
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.mode, DistillMode):
            object.__setattr__(self, "mode", _parse_mode(self.mode))
        if not 0.0 <= self.weight <= 1.0:
            raise DistillError(f"distillation weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0.0:
            raise DistillError(f"distillation temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise DistillError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def resolved_mode(self, student_distilled: bool) -> DistillMode:
        if self.mode is DistillMode.AUTO:
            return DistillMode.HARD if student_distilled else DistillMode.SOFT
        return self.mode

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DistillError(f"unknown distillation key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))


def _parse_mode(value: object) -> DistillMode:
    try:
        return DistillMode(str(value).lower())
    except ValueError:
        known = ", ".join(m.value for m in DistillMode)
        raise DistillError(f"unknown distillation mode {value!r}; use {known}") from None


@dataclass(frozen=True)
class LossParts:
    """The total loss (for backward) and its parts (detached, for logs); ``logits`` scores accuracy."""

    total: torch.Tensor
    ce: float
    kd: float
    logits: torch.Tensor


def soft_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``τ²·KL(softmax(t/τ) ‖ softmax(s/τ))``, summed over classes and averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def split_student(outputs: StudentOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class logits, distillation logits or None) from a model's train-mode output."""
    if isinstance(outputs, tuple):
        if len(outputs) != 2:
            raise DistillError(f"a distilled student returns 2 logits tensors, got {len(outputs)}")
        return outputs[0], outputs[1]
    return outputs, None


def eval_logits(outputs: StudentOutput) -> torch.Tensor:
    """The logits used for accuracy: the mean of both heads for a distilled model (as in eval mode)."""
    cls_logits, dist_logits = split_student(outputs)
    return cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2


def distillation_loss(
    outputs: StudentOutput, targets: torch.Tensor, teacher_logits: torch.Tensor | None, config: DistillConfig
) -> LossParts:
    """CE on labels plus the KD term of ``config`` (see the module docstring)."""
    cls_logits, dist_logits = split_student(outputs)
    ce = F.cross_entropy(cls_logits, targets, label_smoothing=config.label_smoothing)
    logits = eval_logits(outputs).detach()
    if config.weight == 0.0:
        return LossParts(total=ce, ce=float(ce.detach()), kd=0.0, logits=logits)
    if teacher_logits is None:
        raise DistillError("a distillation weight above 0 needs teacher logits")
    kd_input = cls_logits if dist_logits is None else dist_logits
    if teacher_logits.shape != kd_input.shape:
        raise DistillError(f"teacher logits {tuple(teacher_logits.shape)} do not match student {tuple(kd_input.shape)}")
    teacher_logits = teacher_logits.detach()
    if config.resolved_mode(dist_logits is not None) is DistillMode.HARD:
        kd = F.cross_entropy(kd_input, teacher_logits.argmax(dim=-1))
    else:
        kd = soft_kd(kd_input, teacher_logits, config.temperature)
    total = (1.0 - config.weight) * ce + config.weight * kd
    return LossParts(total=total, ce=float(ce.detach()), kd=float(kd.detach()), logits=logits)


class LossFn(Protocol):
    """What the training step calls: ``loss_fn(images, outputs, targets) -> LossParts``."""

    def __call__(self, images: torch.Tensor, outputs: StudentOutput, targets: torch.Tensor) -> LossParts: ...


class ClassificationLoss:
    """Cross-entropy on labels only (training from scratch)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.config = DistillConfig(weight=0.0, label_smoothing=label_smoothing)

    def __call__(self, images: torch.Tensor, outputs: StudentOutput, targets: torch.Tensor) -> LossParts:
        return distillation_loss(outputs, targets, None, self.config)


class DistillationLoss:
    """CE + KD from ``teacher``, which is run (in eval mode, without gradients) on the same images."""

    def __init__(self, teacher: nn.Module, config: DistillConfig = DistillConfig()) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.config = config

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.teacher(images)
        return eval_logits(out)

    def __call__(self, images: torch.Tensor, outputs: StudentOutput, targets: torch.Tensor) -> LossParts:
        teacher_logits = self.teacher_logits(images) if self.config.weight > 0 else None
        return distillation_loss(outputs, targets, teacher_logits, self.config)


def distillation_loss_fn(teacher: nn.Module | None, *, weight: float, temperature: float) -> Any:
    """CE + KD from ``teacher`` (a frozen copy of the base), or CE alone when ``weight`` is 0."""
    if weight == 0.0 or teacher is None:
        return ClassificationLoss()
    return DistillationLoss(teacher, DistillConfig(weight=weight, temperature=temperature))


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A copy of the dense model to distil from (no gates, eval mode, no gradients)."""
    teacher = copy.deepcopy(model)
    teacher.disable_gates()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
