"""How long pruning takes: the steps the pace implies, epochs of the data, the re-estimated total, the ETA."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from nvit.errors import NvitError, TargetError
from nvit.lut.base import FlopsPredictor
from nvit.models import build_model
from nvit.presets import preset
from nvit.progress import StepClock, format_duration
from nvit.pruning.config import PruneConfig, Target
from nvit.pruning.loop import prune
from nvit.pruning.schedule import MANY_EPOCHS, PruneSchedule, plan_schedule, pruning_steps_to, steps_per_epoch
from nvit.training.batches import StepBatches

SPEC = preset("vit_test")
DENSE_MS = 4.0


def test_nvit_pace_to_two_ratios_is_fifty_thousand_steps_of_a_small_folder() -> None:
    per_epoch = steps_per_epoch(4000, 128)
    assert per_epoch == 31  # 4000 / 128 = 31.25: the last partial batch is dropped
    plan = PruneSchedule(10.0, (0.7 * 10.0, 0.5 * 10.0), pace=0.001, interval_steps=100, steps_per_epoch=per_epoch)
    assert plan.pruning_steps == 500 and plan.total_steps == 50_000  # (1 − 0.5) / 0.001, not 501 by rounding
    assert plan.epochs == pytest.approx(50_000 / 31) and round(plan.epochs) == 1613
    assert plan.many_epochs and MANY_EPOCHS == 10
    # ImageNet at the same pace: 1.28 M images at batch 128 is 10,009 steps per epoch, 5 epochs
    imagenet = PruneSchedule(10.0, (5.0,), 0.001, 100, steps_per_epoch(1_281_167, 128))
    assert imagenet.epochs == pytest.approx(4.996, abs=1e-3) and not imagenet.many_epochs
    assert PruneSchedule(10.0, (5.0,), 0.001, 100).epochs is None  # no data size: no epochs
    # README's example for the same folder: 12 + 8 pruning steps of 10, 6.5 epochs
    readme = PruneSchedule(10.0, (7.0, 5.0), pace=0.025, interval_steps=10, steps_per_epoch=per_epoch)
    assert (readme.pruning_steps, readme.total_steps, round(readme.epochs, 1)) == (20, 200, 6.5)


def test_targets_are_met_one_segment_at_a_time() -> None:
    # the loop never passes the next target in one step: 1 → 0.75 takes 3 steps at 0.1, 0.75 → 0.5 three more
    assert pruning_steps_to(1.0, (0.75, 0.5), 0.1) == 6 and pruning_steps_to(1.0, (0.5,), 0.1) == 5
    assert pruning_steps_to(1.0, (0.5, 0.75), 0.1) == 6  # any order
    assert pruning_steps_to(0.6, (0.75, 0.5), 0.1) == 1  # 0.75 is already met
    assert pruning_steps_to(0.5, (0.75, 0.5), 0.1) == 0
    plan = PruneSchedule(10.0, (5.0, 7.5), pace=0.1, interval_steps=7)
    assert plan.targets_ms == (7.5, 5.0) and plan.total_steps == 42
    with pytest.raises(NvitError):
        PruneSchedule(10.0, (12.0,), 0.1, 7)
    with pytest.raises(NvitError):
        pruning_steps_to(1.0, (0.5,), 0.0)


def test_the_total_is_re_estimated_from_the_latency_reached_and_converges() -> None:
    plan = PruneSchedule(10.0, (7.0, 5.0), pace=0.01, interval_steps=10)  # 50 pruning steps, 500 steps
    assert plan.total_steps_from(0, 10.0) == 500 and plan.total_steps_from(3, 10.0) == 500
    # on pace after 10 pruning steps (10 → 9 ms): 40 more
    assert plan.total_steps_from(100, 9.0) == 500 and plan.total_steps_from(105, 9.0) == 500
    # twice the pace so far (2 ms in 10 pruning steps): the rest at that rate, 5 + 10 pruning steps
    assert plan.total_steps_from(100, 8.0) == (10 + 5 + 10) * 10
    # slower than the pace (steps clipped at a target): never fewer steps than the pace implies
    assert plan.total_steps_from(100, 9.5) == (10 + 25 + 20) * 10
    # every target met: the run ends where it is
    assert plan.total_steps_from(230, 4.9) == 230 and plan.total_steps_from(230, 5.0) == 230


def _digits(batch_size: int) -> StepBatches:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:512], dtype=torch.float32)[:, None] / 16.0
    return StepBatches(TensorDataset((x - x.mean()) / x.std(), torch.tensor(d.target[:512])), batch_size=batch_size)


@pytest.mark.parametrize("targets", [(Target.ratio(0.6),), (Target.ratio(0.7), Target.latency("2ms"))])
def test_plan_bounds_the_loop_and_the_estimate_ends_at_its_length(tmp_path, targets) -> None:
    cfg = PruneConfig(targets=targets, interval=2, pace=0.08, min_embed_dim=32, lr=1e-3, batch_size=16, seed=0)
    predictor = FlopsPredictor(SPEC, reference_ms=DENSE_MS)
    data = _digits(16)
    assert data.steps_per_epoch == steps_per_epoch(512, 16) == 32
    plan = plan_schedule(SPEC, cfg, predictor, data.steps_per_epoch)
    # 0.4 / 0.08 = 5 pruning steps; 0.3 / 0.08 → 4, then 2 ms = 0.5 of dense: 0.2 / 0.08 → 3
    assert plan.pruning_steps == (5 if len(targets) == 1 else 7)
    assert plan.targets_ms == pytest.approx((2.4,) if len(targets) == 1 else (2.8, 2.0))
    estimates: list[tuple[int, int]] = []

    def on_step(r) -> None:
        estimates.append((r.step + 1, plan.total_steps_from(r.step + 1, r.predicted_latency_ms)))

    result = prune(build_model(SPEC, seed=0), config=cfg, predictor=predictor, data=data, out_dir=tmp_path,
                   on_step=on_step)
    assert result.steps % cfg.interval == 0 and result.steps <= plan.total_steps
    assert estimates[-1] == (result.steps, result.steps)  # the bar's total converges on the true length
    assert all(done <= total for done, total in estimates)
    if len(targets) == 1:
        assert result.steps == plan.total_steps == 10  # the oracle of the pace test in test_prune_loop.py


def test_plan_refuses_what_the_loop_refuses() -> None:
    cfg = PruneConfig(targets=(Target.latency("0.001ms"),), min_embed_dim=32)
    with pytest.raises(TargetError, match="smallest reachable"):
        plan_schedule(SPEC, cfg, FlopsPredictor(SPEC, reference_ms=DENSE_MS))


def test_step_clock_leaves_out_the_first_step_and_follows_recent_steps() -> None:
    now = [0.0]
    clock = StepClock(window_steps=3, clock=lambda: now[0])
    assert clock.seconds_per_step is None and clock.eta_seconds(10) is None
    for t in (30.0, 31.0, 32.0, 33.0):  # the first step took 30 s (warm-up), the next ones 1 s each
        now[0] = t
        clock.tick()
    assert clock.timed_steps == 3 and clock.seconds_per_step == pytest.approx(1.0)
    assert clock.eta_seconds(100) == pytest.approx(100.0) and clock.eta_seconds(-5) == 0
    for t in (35.0, 37.0, 39.0):  # steps slow to 2 s: the window of 3 forgets the fast ones
        now[0] = t
        clock.tick()
    assert clock.timed_steps == 6 and clock.seconds_per_step == pytest.approx(2.0)
    with pytest.raises(ValueError):
        StepClock(0)


DURATIONS = [(0, "0 s"), (42.4, "42 s"), (89, "89 s"), (90, "2 min"), (725, "12 min"), (5340, "89 min"),
             (5400, "1 h 30 min"), (7 * 3600 + 300, "7 h 05 min"), (47 * 3600, "47 h 00 min"),
             (3 * 86400 + 4 * 3600, "3 d 4 h")]


@pytest.mark.parametrize(("seconds", "text"), DURATIONS)
def test_durations_read_as_rounded_words(seconds, text) -> None:
    assert format_duration(seconds) == text
