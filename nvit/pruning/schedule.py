"""How long a pruning run takes: the training steps its pace implies, in epochs of the data.

The loop (:mod:`nvit.pruning.loop`) trains ``interval`` steps, then takes a pruning step after training
steps ``interval``, ``2·interval``, ...; there is no warm-up before the first interval. A pruning step
removes groups until the predicted latency has dropped by ``pace`` of the starting latency, but never goes
past the next target in one step (so that each variant lands just at its target); the run ends at the
pruning step that reaches the lowest target. From a latency ``L`` the targets ``t1 > t2 > ...`` below it
therefore take ``ceil((L − t1)/(pace·L0)) + ceil((t1 − t2)/(pace·L0)) + ...`` pruning steps, ``L0`` the
starting latency, and ``interval`` training steps each. That is an upper bound: a step removes whole
groups and usually a little more than the pace (much more on a small model, where one group can cost
several times the pace), so :meth:`PruneSchedule.total_steps_from` refines it with the latency removed
per pruning step so far.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nvit.errors import NvitError

if TYPE_CHECKING:
    from nvit.arch import ArchSpec
    from nvit.lut.base import Predictor
    from nvit.pruning.config import PruneConfig

log = logging.getLogger(__name__)

#: A plan longer than this many epochs of the training data is worth a warning.
MANY_EPOCHS = 10.0
_TOLERANCE_STEPS = 1e-6  # (1 − 0.7)/0.001 is 300.00000000000006 in floating point: 300 steps, not 301


def pruning_steps_to(latency_ms: float, targets_ms: Iterable[float], removed_per_step_ms: float) -> int:
    """Pruning steps from ``latency_ms`` to the lowest of ``targets_ms`` (those at or above it are met)
    when each step removes ``removed_per_step_ms`` and stops at the next target."""
    if not removed_per_step_ms > 0:
        raise NvitError(f"the latency removed per pruning step must be positive, got {removed_per_step_ms}")
    steps, level = 0, latency_ms
    for target in sorted(targets_ms, reverse=True):
        if target >= level:
            continue
        steps += max(1, math.ceil((level - target) / removed_per_step_ms - _TOLERANCE_STEPS))
        level = target
    return steps


@dataclass(frozen=True)
class PruneSchedule:
    """The training steps a run's pace implies (an estimate; see the module's docstring)."""

    start_latency_ms: float  # predicted latency of the model pruning starts from
    targets_ms: tuple[float, ...]  # every target in ms (ratios times the starting latency), highest first
    pace: float  # fraction of the starting latency removed per pruning step
    interval_steps: int  # training steps per pruning step
    steps_per_epoch: int | None = None  # full batches per pass over the training data (the last partial one is dropped)

    def __post_init__(self) -> None:
        if not self.start_latency_ms > 0 or not math.isfinite(self.start_latency_ms):
            raise NvitError(f"the starting latency must be positive, got {self.start_latency_ms}")
        if not 0 < self.pace < 1:
            raise NvitError(f"the pace must be in (0, 1), got {self.pace}")
        if self.interval_steps < 1 or (self.steps_per_epoch is not None and self.steps_per_epoch < 1):
            raise NvitError("the interval and the steps per epoch must be positive")
        targets = tuple(sorted((float(t) for t in self.targets_ms), reverse=True))
        if not targets or targets[0] >= self.start_latency_ms or targets[-1] <= 0:
            raise NvitError("every target must lie between 0 and the starting latency")
        object.__setattr__(self, "targets_ms", targets)

    @property
    def pace_ms(self) -> float:
        """Latency the pace removes per pruning step."""
        return self.pace * self.start_latency_ms

    @property
    def pruning_steps(self) -> int:
        return pruning_steps_to(self.start_latency_ms, self.targets_ms, self.pace_ms)

    @property
    def total_steps(self) -> int:
        """Training steps to the lowest target at the pace (the run ends at its last pruning step)."""
        return self.pruning_steps * self.interval_steps

    @property
    def epochs(self) -> float | None:
        """Passes over the training data that :attr:`total_steps` makes (None without ``steps_per_epoch``)."""
        return None if self.steps_per_epoch is None else self.total_steps / self.steps_per_epoch

    @property
    def many_epochs(self) -> bool:
        return self.epochs is not None and self.epochs > MANY_EPOCHS

    def total_steps_from(self, steps_done: int, latency_ms: float) -> int:
        """The run's length re-estimated after ``steps_done`` training steps at predicted ``latency_ms``.

        Targets at or above ``latency_ms`` are met (the loop saves a variant once the latency is at or below
        it). The rest take the pruning steps that the larger of the pace and the mean latency removed per
        pruning step so far implies, after the pruning step due next. Once every target is met it is
        ``steps_done``: the estimate converges on the run's true length.
        """
        if not any(t < latency_ms for t in self.targets_ms):
            return steps_done
        done = steps_done // self.interval_steps
        per_step_ms = self.pace_ms
        if done > 0:
            per_step_ms = max(per_step_ms, (self.start_latency_ms - latency_ms) / done)
        return (done + pruning_steps_to(latency_ms, self.targets_ms, per_step_ms)) * self.interval_steps


def steps_per_epoch(dataset_size: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches in one pass over ``dataset_size`` items (as :class:`~nvit.training.batches.StepBatches`
    makes them: the last partial batch of an epoch is dropped)."""
    if batch_size < 1 or world_size < 1:
        raise NvitError("batch size and world size must be positive")
    return dataset_size // (batch_size * world_size)


def plan_schedule(spec: ArchSpec, config: PruneConfig, predictor: Predictor,
                  steps_per_epoch: int | None = None) -> PruneSchedule:
    """The schedule of pruning ``spec`` with ``config``: targets resolved to ms as the loop resolves them
    (unreachable ones are refused with the same error)."""
    from nvit.pruning.limits import pruning_layout
    from nvit.pruning.targets import resolve_targets

    resolved = resolve_targets(config.targets, predictor, pruning_layout(spec, config, predictor))
    schedule = PruneSchedule(predictor.predict_ms(spec), tuple(r.latency_ms for r in resolved), config.pace,
                             config.interval, steps_per_epoch)
    log.info("the pace implies %d pruning steps, %d training steps (%s epochs)", schedule.pruning_steps,
             schedule.total_steps, "?" if schedule.epochs is None else f"{schedule.epochs:.3g}")
    return schedule
