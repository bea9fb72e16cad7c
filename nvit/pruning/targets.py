"""A run's targets in milliseconds: a ratio of the dense prediction or an absolute latency, checked against
what the layout can reach before any work, highest first."""

from __future__ import annotations

from dataclasses import dataclass

from nvit.errors import TargetError
from nvit.lut.base import Predictor
from nvit.pruning.config import Target, TargetKind
from nvit.pruning.groups import GroupLayout


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
