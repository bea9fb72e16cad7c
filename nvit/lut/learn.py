"""A table learns from the whole models it was measured against.

Every whole-model measurement made with a table's backend and settings (a pruning run's measured targets,
``nvit compare``, the self-check ``nvit lut check --save`` stores) is a calibration row in waiting: a model of
known composition and its latency on the table's device. :func:`learn` adds them to the table's own
calibration models and refits the calibration (:mod:`nvit.lut.calibration`: a scale, an offset and a
per-block term, each following the model's composition: its sum of parts, depth and, through the parts,
its removed sub-layers and widths). The result is a *new* table (the caller writes it to a new file; the
parent is never edited): the record says which version it is, its parent's digest, how many models came
from where, and how well it predicts models it did not see.

**Judged on held-out models.** Each learned model is left out in turn, the calibration refitted without it,
and its latency predicted: the mean absolute error of those predictions, against the parent table's error
on the same models, is the figure ``lut show`` prints. The fit's own residuals are kept too, but never
quoted as its accuracy.

Measurements are drift-corrected to the machine's state at profiling (the loop's and ``compare``'s
``corrected_ms``), so a learned row says what the model cost when the parts were measured. Reading them
from run summaries and reports, and refusing those of another device, is
:mod:`nvit.validation.measured_models`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.arch import ArchSpec
from nvit.errors import LutError
from nvit.lut.meta import utc_now
from nvit.lut.records import Calibration

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MeasuredModel:
    """One whole model timed with the table's backend: ``measured_ms`` is drift-corrected to profiling time."""

    name: str
    arch: ArchSpec
    measured_ms: float
    source: str  # "prune" | "compare" | "self-check"
    origin: str  # the file it was read from

    def __post_init__(self) -> None:
        if not (np.isfinite(self.measured_ms) and self.measured_ms > 0):
            raise LutError(f"{self.origin}: {self.name} has no usable latency ({self.measured_ms!r})")


def _fit(raw: Any, names: list[str], archs: list[ArchSpec], measured: list[float]) -> Calibration:
    """The calibration record fitted on these models, priced by ``raw`` (the table's uncalibrated predictor)."""
    from nvit.lut.calibration import fit_calibration

    floors = raw.floors_for(archs)
    compositions = [raw.composition(a, floors) for a in archs]
    record = fit_calibration(names, measured, [c.raw_ms for c in compositions], compositions=compositions,
                             floors=floors)
    return record.with_archs([a.to_dict() for a in archs])


def _predict(table: Any, calibration: Calibration, arch: ArchSpec) -> float:
    from nvit.lut.predictor import LatencyPredictor

    predictor = LatencyPredictor(table.with_meta(calibration=calibration))
    predictor.warn_outside = False
    return predictor.predict_ms(arch)


def learn(table: Any, measured: Sequence[MeasuredModel], *, parent_sha256: str | None = None) -> Any:
    """A new table whose calibration is refitted on its own calibration models plus ``measured`` (one row per
    architecture: the median of its measurements), with the held-out judgement in its record (module doc)."""
    parent = table.meta.calibration
    if parent is None or not all(m.arch for m in parent.models):
        raise LutError("the table's calibration does not list its models' architectures (an older table); "
                       "re-profile it to learn from measured models")
    if not measured:
        raise LutError("no measured models to learn from")
    by_arch: dict[str, list[MeasuredModel]] = {}
    for m in measured:
        by_arch.setdefault(json.dumps(m.arch.to_dict(), sort_keys=True), []).append(m)
    learned = [(group[0], float(np.median([m.measured_ms for m in group]))) for group in by_arch.values()]
    own = [(m.name, ArchSpec.from_dict(m.arch), float(m.measured_ms)) for m in parent.models if m.arch]
    was_learned = [m.learned for m in parent.models]  # an earlier version's learned rows stay
    new = [(f"learned-{i}-{m.name}", m.arch, ms) for i, (m, ms) in enumerate(learned)]
    rows = own + new

    from nvit.lut.predictor import LatencyPredictor

    raw = LatencyPredictor(table, calibrated=False)  # what every fit prices the models with
    before = LatencyPredictor(table)  # the parent's calibration
    before.warn_outside = False
    held_out = []
    if len(new) >= 2:  # each learned model predicted by the fit to everything else
        for i, (name, arch, ms) in enumerate(new):
            rest = own + new[:i] + new[i + 1:]
            record = _fit(raw, [r[0] for r in rest], [r[1] for r in rest], [r[2] for r in rest])
            held_out.append({"name": name, "measured_ms": ms, "before_ms": before.predict_ms(arch),
                             "after_ms": _predict(table, record, arch)})
    record = _fit(raw, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    record = record.replace(models=tuple(dataclasses.replace(m, learned=flag) for m, flag
                                         in zip(record.models, was_learned + [True] * len(new), strict=True)))

    def mape(key: str) -> float | None:
        if not held_out:
            return None
        return float(np.mean([abs(h[key] / h["measured_ms"] - 1) for h in held_out]) * 100)

    def bias(key: str) -> float | None:
        if not held_out:
            return None
        return float(np.mean([h[key] / h["measured_ms"] - 1 for h in held_out]) * 100)

    sources: dict[str, int] = {}
    for m, _ in learned:
        sources[m.source] = sources.get(m.source, 0) + 1
    previous = parent.learned or {}
    record = record.replace(learned={
        "version": int(previous.get("version", 1)) + 1,
        "parent_sha256": parent_sha256,
        "parent_method": parent.method,
        "models": len(new) + int(previous.get("models", 0)), "new_models": len(new),
        "own_models": len(own) - sum(was_learned), "sources": {
            k: sources.get(k, 0) + int((previous.get("sources") or {}).get(k, 0))
            for k in set(sources) | set(previous.get("sources") or {})},
        "origins": sorted({m.origin for m, _ in learned}),
        "held_out": {"n": len(held_out), "mape_pct_before": mape("before_ms"), "mape_pct_after": mape("after_ms"),
                     "bias_pct_before": bias("before_ms"), "bias_pct_after": bias("after_ms"), "models": held_out},
        "learned_at": utc_now(),
    })
    log.info("learned from %d measured models: held-out MAPE %s -> %s", len(new), mape("before_ms"),
             mape("after_ms"))
    return table.with_meta(calibration=record)


def learned_line(calibration: Calibration | None) -> str | None:
    """One line on what the table learned from measured models (``None`` when it learned nothing)."""
    info = None if calibration is None else calibration.learned
    if not info:
        return None
    sources = ", ".join(f"{n} {k}" for k, n in sorted(info["sources"].items()))
    held = info["held_out"]
    judged = (f"held-out (each left out of the fit in turn): MAPE {held['mape_pct_before']:.2f}% with the parent "
              f"calibration → {held['mape_pct_after']:.2f}% (bias {held['bias_pct_before']:+.2f}% → "
              f"{held['bias_pct_after']:+.2f}%) on {held['n']} models") if held["n"] else \
        "not judged: fewer than 2 learned models to leave out"
    parent = f" of {info['parent_sha256'][:12]}" if info.get("parent_sha256") else ""
    return (f"calibration version {info['version']}{parent}: learned from {info['models']} measured models "
            f"({sources}) beside its own {info['own_models']}; {judged}")
