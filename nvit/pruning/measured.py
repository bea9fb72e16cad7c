"""Targets met at measured latency: measure the variant where pruning crosses a target, and keep pruning
while it misses.

A table's errors are where an optimiser over it goes: the ranking picks the options the table prices too
cheaply. So when the predicted latency crosses a target, the variant is timed (a
:class:`TargetMeasurer`: the table's backend and settings, interleaved with a few of the table's own rows so
drift since profiling is corrected: :mod:`nvit.validation.targets`). If it meets the target within the
measurement's own noise, it is saved with both figures. If not, the ratio measured / predicted becomes the
run's *correction*: every pending target's predicted goal is divided by it, pruning continues, and the
variant is measured again at the corrected goal. When the corrected goal lies below the smallest latency
the table can reach, the smallest variant is saved and its provenance says by how much it missed.

Only rank 0 measures under ``torchrun``; the others receive its figures (a sum-reduction where they add
zero), so every rank takes the same decision. The correction and every measurement are checkpointed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from nvit.arch import ArchSpec

log = logging.getLogger(__name__)

#: At most this many measurements per target (a table far off, or noise that never settles, must end).
MAX_MEASUREMENTS_PER_TARGET = 6


@dataclass(frozen=True)
class TargetMeasurement:
    """One variant timed at a target: raw and drift-corrected median, its relative uncertainty, the drift
    ratio applied (now / when the table was profiled) and the seconds it took."""

    measured_ms: float
    corrected_ms: float
    uncertainty_rel: float
    drift_ratio: float
    seconds: float

    def to_list(self) -> list[float]:
        return [self.measured_ms, self.corrected_ms, self.uncertainty_rel, self.drift_ratio, self.seconds]

    @classmethod
    def from_list(cls, values: list[float]) -> TargetMeasurement:
        return cls(*(float(v) for v in values))


class TargetMeasurer(Protocol):
    """Times a pruned model the way the table's device would (``spec`` and the sliced ``model``)."""

    def __call__(self, spec: ArchSpec, model: Any) -> TargetMeasurement: ...


@dataclass(frozen=True)
class Decision:
    """What a measurement at a target decided: save (``met`` or, at the floor, ``missed``) or keep pruning."""

    save: bool
    met: bool
    record: dict[str, Any]


class MeasuredTargets:
    """The run's measured-target state: the correction (measured / predicted at the last measurement) and
    every measurement made (see the module doc)."""

    def __init__(self, measurer: TargetMeasurer | None, *, broadcast: Callable[[list[float]], list[float]],
                 is_main: bool) -> None:
        self.measurer = measurer
        self.broadcast = broadcast
        self.is_main = is_main
        self.correction = 1.0
        self.records: list[dict[str, Any]] = []

    @property
    def active(self) -> bool:
        return self.measurer is not None

    def goal_ms(self, target_ms: float, floor_ms: float) -> float:
        """The predicted latency pruning aims at for a target: the target over the correction, never below
        the smallest reachable prediction."""
        return max(floor_ms, target_ms / self.correction)

    def measure(self, label: str, target_ms: float, predicted_ms: float, floor_ms: float, step: int,
                spec: ArchSpec, model: Any) -> Decision:
        """Time the variant (rank 0) and decide; every rank returns the same decision."""
        values = [0.0] * 5
        if self.is_main and self.measurer is not None:
            values = self.measurer(spec, model).to_list()
        m = TargetMeasurement.from_list(self.broadcast(values))
        bound = target_ms * (1.0 + m.uncertainty_rel)
        met = m.corrected_ms <= bound
        tries = sum(1 for r in self.records if r["target"] == label) + 1
        at_floor = predicted_ms <= floor_ms * (1.0 + 1e-9)
        record = {"target": label, "target_ms": target_ms, "step": step, "predicted_ms": predicted_ms,
                  **asdict(m), "met": met, "try": tries, "correction_before": self.correction,
                  "arch": spec.to_dict()}  # a calibration row in waiting (nvit.lut.learn)
        self.records.append(record)
        if met:
            log.info("%s: measured %.4g ms (drift-corrected) meets %.4g ms", label, m.corrected_ms, target_ms)
            return Decision(True, True, record)
        self.correction = max(self.correction, m.corrected_ms / predicted_ms) if predicted_ms > 0 else self.correction
        if at_floor or tries >= MAX_MEASUREMENTS_PER_TARGET:
            why = "the table's smallest reachable latency" if at_floor else f"{tries} measurements"
            log.warning("%s: measured %.4g ms misses %.4g ms by %+.1f%% at %s; saved as it is", label,
                        m.corrected_ms, target_ms, 100 * (m.corrected_ms / target_ms - 1), why)
            return Decision(True, False, {**record, "stopped_by": why})
        log.info("%s: measured %.4g ms misses %.4g ms; correction %.3f, pruning on", label, m.corrected_ms,
                 target_ms, self.correction)
        return Decision(False, False, record)

    def state_dict(self) -> dict[str, Any]:
        return {"correction": self.correction, "records": list(self.records)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.correction = float(state.get("correction", 1.0))
        self.records = list(state.get("records", []))

    def summary(self) -> dict[str, Any]:
        return {"measured": self.active, "correction": self.correction, "measurements": len(self.records),
                "seconds": sum(float(r["seconds"]) for r in self.records), "records": list(self.records)}
