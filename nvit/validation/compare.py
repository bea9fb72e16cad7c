"""Measured vs predicted latency of model variants: the check that decides whether a LUT can be trusted."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nvit import __version__
from nvit.arch import ArchSpec
from nvit.fileio import atomic_write_text
from nvit.lut.base import Predictor
from nvit.validation.drift import (
    DEFAULT_REFERENCES,
    correction_from,
    mean_block_ms,
    reference_rows,
    reference_workloads,
)

logger = logging.getLogger(__name__)

#: 3: each result's architecture; 2: per-row noise, drift since profiling, order conflicts and a trust verdict
COMPARE_SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Variant:
    """A model to compare: its name, spec, the module to time, and what its provenance says."""

    name: str
    spec: ArchSpec
    module: Any  # torch.nn.Module
    path: str | None = None
    target_ms: float | None = None
    top1: float | None = None


@dataclass(frozen=True)
class VariantResult:
    name: str
    path: str | None
    params: int
    macs: int
    embed_dim: int
    heads: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    predicted_ms: float
    measured_ms: float
    measured_ms_p10: float
    measured_ms_p90: float
    error_pct: float
    speedup_measured: float
    speedup_predicted: float
    target_ms: float | None
    target_met_predicted: bool | None
    target_met_measured: bool | None
    top1: float | None
    noise: tuple[str, ...] = ()  # why this row's measurement cannot be trusted (empty: it can)
    uncertainty_pct: float = 0.0  # the measurement's own uncertainty (CI of the median, gap between passes)
    drift_ratio: float = 1.0  # the machine now / when the table was profiled, at this model's work size
    error_pct_drift_corrected: float | None = None  # predicted vs measured / drift_ratio (None: not re-timed)
    arch: dict[str, Any] | None = None  # the model's architecture (what nvit lut learn refits on)

    @property
    def noisy(self) -> bool:
        return bool(self.noise)


@dataclass(frozen=True)
class CompareReport:
    base: str
    results: tuple[VariantResult, ...]
    context: dict[str, Any] = field(default_factory=dict)

    def trust(self) -> Any:
        """How far these figures can be trusted (:class:`nvit.validation.trust.Trust`)."""
        from nvit.validation.trust import judge_report

        return judge_report(self)

    @property
    def mean_abs_error_pct(self) -> float:
        return sum(abs(r.error_pct) for r in self.results) / len(self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": COMPARE_SCHEMA_VERSION,
            "kind": "nvit.compare",
            "nvit_version": __version__,
            "created_unix_s": time.time(),
            "base": self.base,
            "mean_abs_error_pct": self.mean_abs_error_pct,
            "trust": self.trust().to_dict(),
            "context": self.context,
            "results": [{**asdict(r), "noisy": r.noisy} for r in self.results],
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        rows = [{k: v for k, v in asdict(r).items() if k != "arch"} for r in self.results]
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, tuple) else v for k, v in row.items()})
        return buf.getvalue()

    def save(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write compare.json and compare.csv into ``folder``; returns the paths (the figure is
        :func:`nvit.plots.save_compare`'s: plotting depends on reports, not the reverse)."""
        folder = Path(folder)
        paths = {"json": folder / "compare.json", "csv": folder / "compare.csv"}
        atomic_write_text(paths["json"], json.dumps(self.as_dict(), indent=2) + "\n")
        atomic_write_text(paths["csv"], self.to_csv())
        return paths


MeasureFn = Callable[[Variant], Any]  # returns a TimingStats


def row_noise(stats: Any) -> tuple[str, ...]:
    """Why one measurement stayed noisy: its passes or repeats never agreed, or every run of it was contended."""
    from nvit.profiler.harness import HarnessConfig

    out = []
    if not getattr(stats, "settled", True):
        out.append(f"its timings never agreed within {100 * PASS_AGREE_REL:.0f}%")
    if getattr(stats, "contention", 0.0) > HarnessConfig.hit_contention:
        out.append(f"waited for a CPU {100 * stats.contention:.0f}% of the time")
    return tuple(out)


def row_uncertainty(stats: Any) -> float:
    """Relative uncertainty of a measured median: its 95% CI half-width, at least the pass agreement bound."""
    median = stats.latency_ms_median
    ci = stats.ci95_halfwidth_ms / median if median > 0 and math.isfinite(stats.ci95_halfwidth_ms) else 1.0
    return max(ci, PASS_AGREE_REL)


def compare_variants(
    base: Variant,
    variants: Sequence[Variant],
    predictor: Predictor,
    measure: MeasureFn,
    *,
    context: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    drift_ratios: Mapping[str, float] | None = None,
) -> CompareReport:
    """Measure and predict ``base`` and every variant; speedups are relative to ``base``. ``drift_ratios``
    (per model name: now / when the table was profiled, :mod:`nvit.validation.drift`) add each row's
    drift-corrected error."""
    check_distinct_names([v.name for v in (base, *variants)])
    timed = {}
    for v in (base, *variants):
        if progress:
            progress(v.name)
        timed[v.name] = (measure(v), predictor.predict_ms(v.spec))
    base_stats, base_pred = timed[base.name]
    results = []
    for v in (base, *variants):
        stats, pred = timed[v.name]
        measured = stats.latency_ms_median
        ratio = float((drift_ratios or {}).get(v.name, 1.0))
        results.append(VariantResult(
            name=v.name, path=v.path, params=v.spec.num_params(), macs=v.spec.macs(),
            embed_dim=_embed_dim(v.spec), heads=tuple(b.heads for b in v.spec.blocks),
            mlp_dims=tuple(b.mlp_dim for b in v.spec.blocks), predicted_ms=pred, measured_ms=measured,
            measured_ms_p10=stats.latency_ms_p10, measured_ms_p90=stats.latency_ms_p90,
            error_pct=100.0 * (pred - measured) / measured,
            speedup_measured=base_stats.latency_ms_median / measured, speedup_predicted=base_pred / pred,
            target_ms=v.target_ms, target_met_predicted=_met(pred, v.target_ms),
            target_met_measured=_met(measured, v.target_ms),
            top1=v.top1, noise=row_noise(stats), uncertainty_pct=100.0 * row_uncertainty(stats),
            drift_ratio=ratio,
            error_pct_drift_corrected=None if drift_ratios is None else 100.0 * (pred * ratio - measured) / measured,
            arch=v.spec.to_dict(),
        ))
        logger.info("%s: predicted %.3f ms, measured %.3f ms (%+.1f%%)", v.name, pred, measured,
                    results[-1].error_pct)
    return CompareReport(base=base.name, results=tuple(results), context=dict(context or {}))


def check_distinct_names(names: Sequence[str]) -> None:
    """Results are keyed by model name: two models with one name would be confused."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            from nvit.errors import NvitError

            raise NvitError(f"two models are named {name!r}; give them distinct names (e.g. --base of another "
                            "name, or variant folders of different names)")
        seen.add(name)


def _met(latency_ms: float, target_ms: float | None) -> bool | None:
    return None if target_ms is None else latency_ms <= target_ms


def backend_for_table(meta: Any) -> Any:
    """A backend (not yet entered) configured as the one that measured the table ``meta`` describes."""
    from nvit.profiler.base import get_backend

    backend_cls = get_backend(meta.backend)
    settings = dict(meta.settings)
    options = dict(settings.get("options") or {})
    if "harness" in settings:
        options["harness"] = settings["harness"]
    return backend_cls(device=meta.device_kind, precision=meta.precision, batch_size=meta.batch_size, **options)


def check_same_device(meta: Any, backend: Any) -> None:
    """Refuse to compare on another device than the table's (a LUT predicts one device only)."""
    from nvit.lut.table import check_compatible
    from nvit.profiler.device import cpu_info
    from nvit.profiler.gpu_probe import gpu_name
    from nvit.vocab import DeviceKind

    # the name its fingerprint records, without probing clocks or versions
    cuda = DeviceKind(backend.device) is DeviceKind.CUDA
    name = gpu_name(backend.cuda_index) if cuda else cpu_info().model_name
    check_compatible(meta, device=name, source="the latency table")


#: Extra passes, at most, for models whose two fastest passes disagree by more than ``PASS_AGREE_REL``.
EXTRA_PASSES = 2
PASS_AGREE_REL = 0.03


def measure_passes(backend: Any, workloads: Sequence[Any], passes: int, *,
                   extra_passes: int = EXTRA_PASSES) -> list[Any]:
    """Time ``workloads`` together with an entered backend, ``passes`` times (later passes in reverse
    order); each workload keeps its fastest pass, so one interrupted pass on a shared machine does not
    decide the result (tables keep the fastest of their passes in the same way). Models whose two fastest
    passes still differ by more than :data:`PASS_AGREE_REL` are timed again, together, up to ``extra_passes``
    times: a noisy moment is re-measured instead of deciding the number."""
    runs = [[s] for s in backend.measure_many(workloads)]
    for k in range(passes - 1):
        order = workloads[::-1] if k % 2 == 0 else workloads
        again = backend.measure_many(order)
        for i, s in enumerate(again[::-1] if k % 2 == 0 else again):
            runs[i].append(s)
    for _ in range(extra_passes if passes > 1 else 0):
        apart = [i for i, rs in enumerate(runs) if pass_gap(rs) > PASS_AGREE_REL]
        if not apart:
            break
        for i, s in zip(apart, backend.measure_many([workloads[i] for i in apart]), strict=True):
            runs[i].append(s)
    best = []
    for rs in runs:
        fastest = min(rs, key=lambda t: t.latency_ms_median)
        best.append(replace(fastest, n_repeats=sum(t.n_repeats for t in rs), runs_hit=sum(t.runs_hit for t in rs),
                            settled=fastest.settled and pass_gap(rs) <= PASS_AGREE_REL))
    return best


def pass_gap(runs: Sequence[Any]) -> float:
    """Relative gap between the two fastest passes (0 for one pass)."""
    medians = sorted(t.latency_ms_median for t in runs)
    return medians[1] / medians[0] - 1.0 if len(medians) > 1 and medians[0] > 0 else 0.0


def measure_with_table(
    meta: Any,
    workloads: Sequence[Any],
    *,
    same_device: bool = True,
    passes: int = 2,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Time ``workloads`` with the backend and settings of the table ``meta`` describes (interleaved, one
    session, :func:`measure_passes`); returns the statistics and the context (table identity, backend
    settings and versions) a report records."""
    from nvit.profiler.conditions import ConditionsMonitor

    backend = backend_for_table(meta)
    with backend:
        if same_device:
            check_same_device(meta, backend)
        check_distinct_names([w.name for w in workloads])
        if progress:
            progress(f"measuring {len(workloads)} models with {backend.name}")
        with ConditionsMonitor(gpu_index=getattr(backend, "cuda_index", None)) as monitor:
            stats = measure_passes(backend, workloads, passes)
        # the gap the robust statistic rests on (two lowest clean repeats), not max / min: one slow repeat of
        # three does not move a minimum of medians
        spread = sorted(s.repeat_settle_gap for s in stats)[len(stats) // 2] if stats else None
        hit = sum(s.runs_hit for s in stats) / max(1, sum(s.n_repeats for s in stats))
        conditions = monitor.conditions(repeat_spread=spread, runs_hit=hit)
        context = {"lut_identity": meta.identity(), "backend": backend.settings(), "versions": backend.versions(),
                   "calibration": None if meta.calibration is None else meta.calibration.to_dict(),
                   "conditions": conditions.to_dict()}
    return stats, context


def _embed_dim(spec: Any) -> int:
    """A ViT's embedding width; a Swin's first stage's (the patch embedding's)."""
    return spec.stages[0].embed_dim if hasattr(spec, "stages") else spec.embed_dim


def compare_with_table(
    table: Any,
    base: Variant,
    variants: Sequence[Variant],
    *,
    same_device: bool = True,
    passes: int = 2,
    progress: Callable[[str], None] | None = None,
    references: int = DEFAULT_REFERENCES,
) -> CompareReport:
    """Measure every model with the table's backend and settings (:func:`measure_with_table`) and compare
    with the table's predictions. ``references`` of the table's own full blocks are re-timed in the same
    session (:mod:`nvit.validation.drift`): how far the machine drifted since profiling, per work size, and each
    row's drift-corrected error."""
    from nvit.errors import LutError
    from nvit.lut import predictor_for
    from nvit.profiler.base import Workload
    from nvit.profiler.workloads import image_shape
    from nvit.swin import SwinSpec

    meta = table.meta
    models = (base, *variants)
    predictor = predictor_for(table)
    for v in models:
        if table.is_swin:  # its predictor checks each model is a Swin it can price
            predictor.check_spec(v.spec)
        elif isinstance(v.spec, SwinSpec):
            raise LutError(f"{v.name} is a Swin and the latency table a ViT table; profile a Swin table "
                           "(nvit profile --arch ...) to compare it")
        elif v.spec.num_tokens != meta.num_tokens:
            raise_tokens(v, meta.num_tokens)
    workloads = [Workload(v.name, v.module, image_shape(v.spec, meta.batch_size)) for v in models]
    stats, context, ratios = measure_beside_references(table, workloads, [v.spec for v in models], predictor,
                                                       rows=reference_rows(table, references),
                                                       same_device=same_device, passes=passes, progress=progress)
    by_name = dict(zip((v.name for v in models), stats, strict=True))
    return compare_variants(base, variants, predictor, lambda v: by_name[v.name], context=context,
                            drift_ratios=None if ratios is None else dict(zip(by_name, ratios, strict=True)))


def measure_beside_references(
    table: Any,
    workloads: Sequence[Any],
    specs: Sequence[ArchSpec],
    predictor: Any,
    *,
    rows: Sequence[dict[str, Any]],
    same_device: bool = True,
    passes: int = 2,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Any], dict[str, Any], list[float] | None]:
    """Time ``workloads`` (models of ``specs``) with the table's settings (:func:`measure_with_table`), with
    the table's reference ``rows`` re-timed in the same session (:mod:`nvit.validation.drift`). Returns the
    models' statistics, the context (with ``drift`` when rows were given) and each model's drift ratio at its
    work size (``None`` without rows)."""
    stats, context = measure_with_table(table.meta, [*workloads, *reference_workloads(table, rows)],
                                        same_device=same_device, passes=passes, progress=progress)
    if not rows:
        return stats, context, None
    drift = correction_from(rows, stats[len(workloads):])
    context["drift"] = drift.to_dict()
    return stats[:len(workloads)], context, [drift.ratio(mean_block_ms(predictor, s)) for s in specs]


def raise_tokens(variant: Variant, num_tokens: int) -> None:
    from nvit.errors import LutError

    raise LutError(f"{variant.name} has {variant.spec.num_tokens} tokens, the latency table was measured at "
                   f"{num_tokens}")
