"""KD loss: hand-computed values on fixed logits, CE at weight 0, hard distillation, strict config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nvit.models import build_model
from nvit.presets import preset
from nvit.training.distill import (
    ClassificationLoss,
    DistillationLoss,
    DistillConfig,
    DistillError,
    DistillMode,
    distillation_loss,
    soft_kd,
)

STUDENT = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
TEACHER = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, -1.0]])
LABELS = torch.tensor([2, 0])


def _softmax(row: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows = logits.tolist()
    return sum(-math.log(_softmax(r, 1.0)[int(y)]) for r, y in zip(rows, labels, strict=True)) / len(rows)


def _hand_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p_t, p_s = _softmax(t_row, tau), _softmax(s_row, tau)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    return tau**2 * total / len(student)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_kd_matches_hand_computed_kl(tau: float) -> None:
    assert soft_kd(STUDENT, TEACHER, tau).item() == pytest.approx(_hand_kd(STUDENT, TEACHER, tau), rel=1e-5)


def test_total_loss_matches_hand_computed_value() -> None:
    config = DistillConfig(weight=0.3, temperature=2.0, mode=DistillMode.SOFT)
    parts = distillation_loss(STUDENT, LABELS, TEACHER, config)
    ce, kd = _hand_ce(STUDENT, LABELS), _hand_kd(STUDENT, TEACHER, 2.0)
    # Hand values for the first row alone, as a second check of the helper: CE = -log softmax(s)[2].
    assert _hand_ce(STUDENT[:1], LABELS[:1]) == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-9)
    assert parts.ce == pytest.approx(ce, rel=1e-5)
    assert parts.kd == pytest.approx(kd, rel=1e-5)
    assert parts.total.item() == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)


def test_weight_zero_is_cross_entropy_and_ignores_teacher() -> None:
    parts = distillation_loss(STUDENT, LABELS, TEACHER, DistillConfig(weight=0.0, temperature=3.0))
    assert parts.total.item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item(), rel=1e-6)
    assert parts.kd == 0.0
    plain = ClassificationLoss()(torch.zeros(2, 1), STUDENT, LABELS)
    assert plain.total.item() == pytest.approx(parts.total.item(), rel=1e-6)


def test_identical_teacher_gives_zero_kd() -> None:
    parts = distillation_loss(STUDENT, LABELS, STUDENT.clone(), DistillConfig(weight=1.0, mode=DistillMode.SOFT))
    assert parts.kd == pytest.approx(0.0, abs=1e-6)


def test_hard_distillation_trains_dist_head_on_teacher_argmax() -> None:
    dist_head = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    parts = distillation_loss((STUDENT, dist_head), LABELS, TEACHER, DistillConfig(weight=0.5))  # AUTO -> HARD
    teacher_argmax = torch.tensor([0, 1])
    assert parts.ce == pytest.approx(_hand_ce(STUDENT, LABELS), rel=1e-5)
    assert parts.kd == pytest.approx(_hand_ce(dist_head, teacher_argmax), rel=1e-5)
    assert parts.total.item() == pytest.approx(0.5 * parts.ce + 0.5 * parts.kd, rel=1e-5)
    assert torch.allclose(parts.logits, (STUDENT + dist_head) / 2)


def test_auto_mode_is_soft_for_plain_students() -> None:
    auto = distillation_loss(STUDENT, LABELS, TEACHER, DistillConfig(weight=1.0, temperature=2.0))
    assert auto.kd == pytest.approx(_hand_kd(STUDENT, TEACHER, 2.0), rel=1e-5)
    hard = distillation_loss(STUDENT, LABELS, TEACHER, DistillConfig(weight=1.0, mode="hard"))
    assert hard.kd == pytest.approx(_hand_ce(STUDENT, torch.tensor([0, 1])), rel=1e-5)


def test_kd_gradient_does_not_reach_teacher_and_scales_with_weight() -> None:
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    distillation_loss(student, LABELS, teacher, DistillConfig(weight=0.5, mode="soft")).total.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_config_is_strict() -> None:
    assert DistillConfig.from_dict({"weight": 0.2, "mode": "hard"}).mode is DistillMode.HARD
    with pytest.raises(DistillError, match="unknown distillation key"):
        DistillConfig.from_dict({"weigth": 0.2})
    with pytest.raises(DistillError, match=r"weight must be in \[0, 1\]"):
        DistillConfig(weight=1.5)
    with pytest.raises(DistillError, match="temperature must be positive"):
        DistillConfig(temperature=0.0)
    with pytest.raises(DistillError, match="unknown distillation mode"):
        DistillConfig(mode="medium")
    with pytest.raises(DistillError, match="needs teacher logits"):
        distillation_loss(STUDENT, LABELS, None, DistillConfig(weight=0.5))
    config = DistillConfig(weight=0.25, temperature=3.0, mode=DistillMode.SOFT)
    assert DistillConfig.from_dict(config.to_dict()) == config


def test_distillation_loss_runs_the_frozen_teacher() -> None:
    spec = preset("vit_test")
    teacher, student = build_model(spec, seed=1), build_model(spec, seed=2).train()
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    loss = DistillationLoss(teacher, DistillConfig(weight=0.5, temperature=2.0))
    parts = loss(images, student(images), labels)
    with torch.no_grad():
        expected = distillation_loss(student(images), labels, teacher(images), loss.config)
    assert parts.total.item() == pytest.approx(expected.total.item(), rel=1e-5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
