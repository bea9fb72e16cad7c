"""The measurer a pruning run uses to meet its targets at measured latency (:mod:`nvit.pruning.measured`).

It times a pruned model with the backend and settings of the table's own profile (:func:`measure_with_table`,
two interleaved passes), beside a few of the table's rows re-timed in the same session, and corrects the
model's median for the drift since profiling at its work size (:mod:`nvit.validation.drift`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any

from nvit.errors import NvitError


class MeasureTargets(str, enum.Enum):
    """``--measure-targets``: ``auto`` (when the table's device is this machine), ``on``, ``off``."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class TableMeasurer:
    """Times pruned models as the table ``table`` was profiled (see the module doc)."""

    def __init__(self, table: Any, *, passes: int = 2, references: int | None = None) -> None:
        from nvit.lut import predictor_for
        from nvit.validation.drift import DEFAULT_REFERENCES, reference_rows

        self.table = table
        self.passes = passes
        self.rows = reference_rows(table, DEFAULT_REFERENCES if references is None else references)
        self.predictor = predictor_for(table)

    def __call__(self, spec: Any, model: Any) -> Any:
        from nvit.profiler.base import Workload
        from nvit.profiler.workloads import image_shape
        from nvit.pruning.measured import TargetMeasurement
        from nvit.validation.compare import measure_beside_references, row_uncertainty

        started = time.perf_counter()
        meta = self.table.meta
        workload = Workload("pruned", model.eval(), image_shape(spec, meta.batch_size))
        stats, _, ratios = measure_beside_references(self.table, [workload], [spec], self.predictor, rows=self.rows,
                                                     passes=self.passes)
        ratio = ratios[0] if ratios else 1.0
        measured = stats[0].latency_ms_median
        return TargetMeasurement(measured, measured / ratio, row_uncertainty(stats[0]), ratio,
                                 time.perf_counter() - started)


def choose_measurer(choice: MeasureTargets | str, table: Any, *,
                    remote: Callable[[], tuple[Any, str]] | None = None) -> tuple[Any, str]:
    """The measurer for ``--measure-targets`` and one line saying what was chosen and why. ``auto`` measures
    when ``table`` (a :class:`~nvit.lut.table.LatencyTable`; ``None`` for a FLOPs proxy) was profiled on
    this machine's kind of device with a backend that runs here, or else when ``remote`` (asked only then)
    offers one: for a table fetched from a service, an agent of its device registered there
    (:func:`nvit.service.remote_measure.remote_measurer`: the measurer and its line, or ``None`` and why not);
    ``on`` requires one of them."""
    choice = MeasureTargets(choice)
    if choice is MeasureTargets.OFF:
        return None, "targets are met at predicted latency (--measure-targets off)"
    why_not = _why_not_here(table)
    if why_not is None:
        return TableMeasurer(table), "targets are met at measured latency: each variant is timed where it crosses " \
                                     "its target, with the table's backend, beside its own rows"
    if remote is not None:
        measurer, line = remote()
        if measurer is not None:
            return measurer, line
        why_not = f"{why_not}; {line}"
    if choice is MeasureTargets.ON:
        raise NvitError(f"--measure-targets on: {why_not}")
    return None, f"targets are predicted only: {why_not}"


def _why_not_here(table: Any) -> str | None:
    if table is None:
        return "the latency proxy has no device to measure on"
    from nvit.validation.compare import backend_for_table, check_same_device

    try:
        backend = backend_for_table(table.meta)
        with backend:
            check_same_device(table.meta, backend)
    except NvitError as exc:
        return f"the table's device cannot be measured here ({exc})"
    return None
