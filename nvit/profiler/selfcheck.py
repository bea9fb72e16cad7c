"""Whole models measured against a table's predictions: the held-out check every profiled table carries
(and ``nvit lut check`` repeats), the measurement loop it shares with the calibration and benchmarks, and
:func:`calibrate` (measure whole models, fit the table's calibration).

The check models are drawn with their own seed (never the calibration's), half of them shaped like the
end of a pruning run (:func:`~nvit.profiler.sampling.pruned_arch`: narrow and wide blocks mixed), half
random non-uniform (:func:`~nvit.profiler.sampling.random_arch`), so a table reports its accuracy where
pruning will use it, on models it was not fitted to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.arch import ArchSpec
from nvit.errors import LutError
from nvit.lut.records import CheckedModel, SelfCheck
from nvit.profiler.sampling import mixed_archs
from nvit.profiler.workloads import model_workload

log = logging.getLogger(__name__)

DEFAULT_CHECK_MODELS = 6
DEFAULT_CHECK_SEED = 500  # calibration models use other seeds (SweepOptions.calibration_seed)
GROUP_SIZE = 4  # whole models timed together (interleaved repeats); a handful, to bound memory


@dataclass(frozen=True)
class ModelTiming:
    """One whole-model measurement: ``pass_index`` of the passes over the set."""

    name: str
    pass_index: int
    latency_ms: float
    stats: dict[str, Any]
    seconds: float


def check_archs(base: ArchSpec, count: int, *, seed: int = DEFAULT_CHECK_SEED,
                removed: bool = False) -> list[ArchSpec]:
    """``count`` held-out models of ``base``: pruned shapes and random ones alternately (seeded), and with
    ``removed`` pruned shapes that lack whole sub-layers and blocks between them."""
    return mixed_archs(base, count, np.random.default_rng(seed), prefix="check-", removed=removed)


def measure_archs(
    backend: Any,
    archs: Sequence[ArchSpec],
    *,
    passes: int = 2,
    first_pass: int = 0,
    seed: int = 0,
    done: Mapping[tuple[str, int], float] | None = None,
    on_timing: Callable[[ModelTiming], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Measure every arch whole with ``backend`` (entered), ``passes`` times (numbered from ``first_pass``),
    each pass in its own random order and grouping, a few models interleaved at a time; return each
    model's fastest median (ms).

    ``done`` holds measurements already made (``(name, pass) -> ms``, e.g. from a journal): they are not
    repeated. ``on_timing`` is called after every new measurement (to journal it); ``should_stop`` is asked
    between groups (a budget), and ends the measuring early when it answers True.
    """
    best: dict[str, float] = {}
    for (name, _), ms in (done or {}).items():
        best[name] = min(ms, best.get(name, ms))
    for p in range(first_pass, first_pass + passes):
        order = [archs[i] for i in np.random.default_rng([seed, p]).permutation(len(archs))]
        todo = [a for a in order if (a.name, p) not in (done or {})]
        for start in range(0, len(todo), GROUP_SIZE):
            if should_stop is not None and should_stop():
                return best
            group = todo[start:start + GROUP_SIZE]
            t0 = time.perf_counter()
            stats = backend.measure_many([model_workload(a, backend.batch_size, name=a.name) for a in group])
            seconds = (time.perf_counter() - t0) / len(group)
            for a, s in zip(group, stats, strict=True):
                best[a.name] = min(s.latency_ms_median, best.get(a.name, s.latency_ms_median))
                if on_timing is not None:
                    on_timing(ModelTiming(a.name, p, s.latency_ms_median, s.as_dict(), seconds))
    return best


def check_report(predictor: Any, archs: Sequence[ArchSpec], measured_ms: Mapping[str, float], *,
                 seed: int, passes: int, measured_at: str) -> SelfCheck:
    """The stored self-check: per-model predicted vs measured, and the figures of
    :func:`nvit.lut.accuracy.error_figures` over all models and over the pruned shapes alone."""
    from nvit.lut.accuracy import error_figures

    models = []
    for a in archs:
        predicted = predictor.predict_ms(a)
        measured = measured_ms[a.name]
        models.append(CheckedModel(a.name, measured, predicted, (predicted - measured) / measured * 100.0,
                                   a.to_dict()))
    figures = error_figures([m.measured_ms for m in models], [m.predicted_ms for m in models])
    shapes: dict[str, Any] = {}
    for label, key in (("pruned", "pruned_shapes"), ("removed", "removed_shapes")):
        some = [m for m in models if label in m.name]
        if some and len(some) < len(models):
            shapes[key] = error_figures([m.measured_ms for m in some], [m.predicted_ms for m in some])
    return SelfCheck(seed=seed, passes=passes, measured_at=measured_at, **figures, models=tuple(models), **shapes)


def recheck(table: Any, backend: Any, *, count: int, seed: int, passes: int = 2,
            on_timing: Callable[[ModelTiming], None] | None = None) -> SelfCheck:
    """Measure ``count`` held-out models now with ``backend`` (entered, configured as the table's) and
    report the table's accuracy on them (the same record as a profiled table's self-check)."""
    from nvit.lut.meta import utc_now
    from nvit.lut.predictor import LatencyPredictor

    if count < 1:
        raise LutError(f"a check needs at least one model, got {count}")
    predictor = LatencyPredictor(table)
    archs = check_archs(ArchSpec.from_dict(table.meta.base_arch), count, seed=seed,
                        removed=predictor.removal_unavailable is None)
    start = time.perf_counter()
    measured = measure_archs(backend, archs, passes=passes, seed=seed, on_timing=on_timing)
    report = check_report(predictor, archs, measured, seed=seed, passes=passes, measured_at=utc_now())
    return report.replace(seconds=time.perf_counter() - start)


def calibrate(table: Any, backend: Any, archs: Sequence[ArchSpec], *, fit_scale: bool = True,
              names: Sequence[str] | None = None) -> Any:
    """Measure ``archs`` whole with ``backend`` (an entered :class:`~nvit.profiler.base.Backend` of the
    table's kind, interleaved so they share machine state) and return the
    :class:`~nvit.lut.table.LatencyTable` with a new calibration."""
    from nvit.lut.predictor import LatencyPredictor, fit_calibration
    from nvit.lut.table import check_compatible
    from nvit.profiler.workloads import model_workload

    meta = table.meta
    check_compatible(meta, device=backend.device, precision=backend.precision, batch_size=backend.batch_size,
                     backend=backend.name, source="the table to calibrate")
    settings = backend.settings()
    if meta.settings and settings != meta.settings:
        diff = sorted(k for k in set(settings) | set(meta.settings) if settings.get(k) != meta.settings.get(k))
        raise LutError(f"the backend's settings differ from the table's ({', '.join(diff)}); "
                       "calibrate with the backend options the table was profiled with")
    names = list(names) if names is not None else [a.name or f"model{i}" for i, a in enumerate(archs)]
    raw = LatencyPredictor(table, calibrated=False)
    floors = raw.floors_for(archs)
    compositions = [raw.composition(a, floors) for a in archs]
    workloads = [model_workload(a, meta.batch_size, name=n) for a, n in zip(archs, names, strict=True)]
    stats = backend.measure_many(workloads)
    measured = [s.latency_ms_median for s in stats]
    calibration = fit_calibration(names, measured, [c.raw_ms for c in compositions], fit_scale=fit_scale,
                                  compositions=compositions, floors=floors)
    calibration = calibration.with_archs([a.to_dict() for a in archs])
    log.info("calibrated %s: scale %.4f, offset %.4f ms, per block %.4f ms (%s)", calibration.method,
             calibration.scale, calibration.offset_ms, calibration.per_block_ms, calibration.verdict)
    return table.with_meta(calibration=calibration)
