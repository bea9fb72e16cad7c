"""What a pruning run reports: every step (for progress bars), every saved variant, and the run's result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nvit.arch import ArchSpec
from nvit.swin import SwinSpec, spec_from_dict


@dataclass(frozen=True)
class StepReport:
    """What the loop tells its caller after every training step (for progress bars)."""

    step: int
    loss: float
    accuracy: float
    predicted_latency_ms: float
    next_target_ms: float | None
    pruned_groups: int
    pruned_now: int
    progress: float  # 0 at the start, 1 at the last target (by predicted latency)
    saved: str | None  # label of the variant saved at this step


@dataclass(frozen=True)
class SavedVariant:
    label: str
    path: str
    target_ms: float
    predicted_latency_ms: float
    step: int
    arch: ArchSpec | SwinSpec
    measured_ms: float | None = None  # drift-corrected, when the run measured its targets
    target_met_measured: bool | None = None


@dataclass(frozen=True)
class PruneResult:
    out_dir: str
    dense_latency_ms: float
    min_latency_ms: float
    variants: tuple[SavedVariant, ...]
    steps: int
    log_path: str
    measured_targets: dict[str, Any] | None = None  # MeasuredTargets.summary() when targets were measured


def variant_dict(v: SavedVariant) -> dict[str, Any]:
    return {"label": v.label, "path": v.path, "target_ms": v.target_ms, "predicted_latency_ms": v.predicted_latency_ms,
            "step": v.step, "arch": v.arch.to_dict(), "measured_ms": v.measured_ms,
            "target_met_measured": v.target_met_measured}


def variant_from_dict(d: Mapping[str, Any]) -> SavedVariant:
    measured = d.get("measured_ms")
    return SavedVariant(d["label"], d["path"], float(d["target_ms"]), float(d["predicted_latency_ms"]),
                        int(d["step"]), spec_from_dict(d["arch"]), None if measured is None else float(measured),
                        d.get("target_met_measured"))
