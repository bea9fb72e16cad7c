"""The timing harness every backend shares: warm-up, adaptive sampling and robust statistics.

Protocol (DESIGN.md §4), per workload:

1. **Warm-up** for ``warmup_s`` seconds of wall time (at least one call), never recorded.
2. **Sampling**: one sample is one call of the workload. Either the harness times the call with a host
   clock (``time.perf_counter``; CPU backends, and GPU backends whose call synchronises), or the call
   returns its own per-iteration time in milliseconds, measured by a device timer (CUDA events around K
   back-to-back launches, see :mod:`nvit.profiler.backends.cuda_timer`).
3. **Stopping**: sample until the 95% confidence half-width of the median is at most
   ``target_rel_ci × median`` (converged), or the sampling time budget is spent, or ``max_samples`` is
   reached; never before ``min_samples``.
4. **Repeats**: on a CPU the whole of step 1-3 is done ``repeats`` times, round-robin over every workload
   timed together (repeat 0 of A, B, C, then repeat 1 of C, A, B, ...), so that configurations timed in
   one session see the same machine state. A shared CPU's medians drift 25-40% between runs; the
   reported statistics come from one repeat chosen by a robust rule (by default the repeat with the
   lowest median: interference only ever adds time).
5. **Recovery**: a probe (:class:`~nvit.profiler.conditions.CpuProbe` by default) reads, around every
   sampling run, how long the measuring threads waited for a CPU. A run that waited more than
   ``hit_contention`` of its time was *hit* by a neighbour and does not decide the statistic while runs
   that were not hit exist. A workload whose clean runs are fewer than two, or whose two lowest clean medians
   differ by more than ``settle_rel``, is re-timed in up to ``recover_rounds`` more interleaved rounds; one
   that is still not settled is reported ``settled = False``.

The confidence interval of the median is distribution-free: the count of samples below the true median
is Binomial(n, ½), so order statistics ``x_(k)`` and ``x_(n+1-k)`` (1-based) bracket the median with
probability ``1 - 2·P(B ≤ k-1)``; ``k`` is the largest rank for which that is at least 95%. With fewer
than 6 samples no such pair exists and the half-width is infinite.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.errors import BackendError
from nvit.profiler.conditions import CpuProbe, NoProbe, Probe

logger = logging.getLogger(__name__)

CI_CONFIDENCE = 0.95
MS_PER_S = 1e3
_CHECK_GROWTH = 8  # re-check convergence after n // _CHECK_GROWTH more samples (geometric cadence)
_PERCENTILES = (10.0, 90.0, 99.0)
_CUDA = "cuda"  # DeviceKind.CUDA's value (the harness does not import the backend interface)

Clock = Callable[[], float]


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated latency measurements of one workload, in milliseconds."""

    latency_ms_median: float
    latency_ms_mean: float
    latency_ms_p10: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_std: float
    cov: float  # coefficient of variation, std / mean
    ci95_halfwidth_ms: float  # 95% confidence half-width of the median
    n_samples: int
    n_repeats: int = 1  # interleaved repeats timed; the fields above describe the one the statistic chose
    repeat_rel_spread: float = 0.0  # max / min of the repeat medians, minus 1
    stop_reason: str = ""  # converged | time_cap | max_samples ("" when not produced by the harness)
    contention: float = 0.0  # share of the chosen run's time its threads waited for a CPU
    runs_hit: int = 0  # sampling runs a neighbour hit (contention above the limit), of all runs timed
    settled: bool = True  # False: even the extra rounds left the clean repeats apart (or none clean)
    repeat_settle_gap: float = 0.0  # the two lowest clean repeat medians' gap (what the statistic rests on)

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class RobustStatistic(str, enum.Enum):
    """How the repeats of one workload are combined into the reported statistics."""

    MIN_OF_MEDIANS = "min_of_medians"  # the repeat with the lowest median (default on CPU)
    MEDIAN_OF_MEDIANS = "median_of_medians"  # the repeat with the middle median (lower middle if even)
    POOLED = "pooled"  # every repeat's samples together


class StopReason(str, enum.Enum):
    CONVERGED = "converged"
    TIME_CAP = "time_cap"
    MAX_SAMPLES = "max_samples"


@dataclass(frozen=True)
class HarnessConfig:
    """Timing protocol. Sample counts are per repeat; ``time_cap_s`` is the sampling budget of one
    workload over all its repeats (warm-up excluded); ``min_samples`` wins over the time cap."""

    warmup_s: float = 0.2
    rewarm_s: float = 0.05  # warm-up before repeats after the first (other workloads ran in between)
    min_samples: int = 10
    max_samples: int = 2000
    time_cap_s: float = 2.0
    target_rel_ci: float = 0.01  # stop when the 95% CI half-width of the median <= this × median
    repeats: int = 3
    statistic: RobustStatistic = RobustStatistic.MIN_OF_MEDIANS
    min_sample_ms: float = 0.0  # device timers: back-to-back iterations per sample so one lasts this long
    recover_rounds: int = 2  # extra interleaved rounds for workloads whose repeats did not settle
    hit_contention: float = 0.05  # a run whose threads waited for a CPU longer than this share was hit
    settle_rel: float = 0.03  # settled: the two lowest clean repeat medians agree within this

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistic", _enum_value(RobustStatistic, self.statistic, "statistic"))
        problems = []
        if self.warmup_s < 0 or self.rewarm_s < 0:
            problems.append("warm-up times must be >= 0")
        if self.min_samples < 1:
            problems.append("min_samples must be >= 1")
        if self.max_samples < self.min_samples:
            problems.append("max_samples must be >= min_samples")
        if self.time_cap_s <= 0:
            problems.append("time_cap_s must be > 0")
        if not 0 < self.target_rel_ci < 1:
            problems.append("target_rel_ci must be in (0, 1)")
        if self.repeats < 1:
            problems.append("repeats must be >= 1")
        if self.min_sample_ms < 0:
            problems.append("min_sample_ms must be >= 0")
        if self.recover_rounds < 0:
            problems.append("recover_rounds must be >= 0")
        if not (self.hit_contention > 0 and self.settle_rel > 0):
            problems.append("hit_contention and settle_rel must be > 0")
        if problems:
            raise BackendError(f"invalid harness config: {'; '.join(problems)}")

    @classmethod
    def cpu(cls) -> HarnessConfig:
        """Defaults for a (possibly shared) CPU: interleaved repeats, min of the repeat medians."""
        return cls()

    @classmethod
    def gpu(cls) -> HarnessConfig:
        """Defaults for a GPU timed with CUDA events: longer warm-up (clocks ramp up), one repeat, each
        sample at least 1 ms of back-to-back launches so event resolution does not matter."""
        return cls(warmup_s=0.5, rewarm_s=0.1, min_samples=10, max_samples=500, time_cap_s=2.0,
                   repeats=1, statistic=RobustStatistic.POOLED, min_sample_ms=1.0, recover_rounds=0)

    @classmethod
    def for_device(cls, device: str) -> HarnessConfig:
        """The defaults for ``device`` (a :class:`~nvit.vocab.DeviceKind` or its value)."""
        return cls.gpu() if str(getattr(device, "value", device)) == _CUDA else cls.cpu()

    def updated(self, changes: Mapping[str, Any]) -> HarnessConfig:
        """This config with the settings in ``changes`` replaced; strict: an unknown key is an error (a typo
        must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise BackendError(f"unknown harness setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def replace(self, **changes: Any) -> HarnessConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["statistic"] = self.statistic.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HarnessConfig:
        """A config from a complete dict (as :meth:`to_dict` writes it); missing keys take the CPU defaults,
        so a partial dict for a GPU should go through :meth:`updated` on :meth:`gpu` instead."""
        return cls().updated(data)


def _enum_value(enum_cls: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in enum_cls)
        raise BackendError(f"invalid {what} {value!r}; choose from {choices}") from None


# ---- statistics ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = CI_CONFIDENCE) -> tuple[int, int] | None:
    """0-based indices ``(lo, hi)`` into the sorted samples bounding a ``confidence`` CI of the median.

    ``None`` when ``n`` is too small for any order-statistic interval to reach ``confidence``.
    """
    tail = (1.0 - confidence) / 2.0
    log_norm = math.lgamma(n + 1) + n * math.log(0.5)
    cdf = 0.0
    k = 0
    for i in range(n // 2 + 1):
        cdf += math.exp(log_norm - math.lgamma(i + 1) - math.lgamma(n - i + 1))
        if cdf > tail:
            break
        k = i + 1
    if k == 0:
        return None
    return k - 1, n - k


def median_ci_halfwidth(sorted_samples: np.ndarray, confidence: float = CI_CONFIDENCE) -> float:
    """Half-width of the distribution-free CI of the median; ``inf`` when there are too few samples."""
    ranks = median_ci_ranks(len(sorted_samples), confidence)
    if ranks is None:
        return math.inf
    lo, hi = ranks
    return float(sorted_samples[hi] - sorted_samples[lo]) / 2.0


def summarize(samples_ms: Sequence[float] | np.ndarray, **extra: Any) -> TimingStats:
    """Statistics of one set of latency samples (ms). Percentiles interpolate linearly (numpy's
    default); ``std`` is the sample standard deviation (ddof=1, 0 for one sample); ``cov = std / mean``.
    ``extra`` sets the repeat/stop fields of :class:`TimingStats`."""
    x = np.sort(np.asarray(samples_ms, dtype=np.float64).ravel())
    if x.size == 0:
        raise BackendError("no latency samples to summarize")
    if not np.all(np.isfinite(x)) or x[0] < 0:
        raise BackendError("latency samples must be finite and non-negative")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    p10, p90, p99 = (float(v) for v in np.percentile(x, _PERCENTILES))
    return TimingStats(
        latency_ms_median=float(np.median(x)),
        latency_ms_mean=mean,
        latency_ms_p10=p10,
        latency_ms_p90=p90,
        latency_ms_p99=p99,
        latency_ms_std=std,
        cov=std / mean if mean > 0 else 0.0,
        ci95_halfwidth_ms=median_ci_halfwidth(x),
        n_samples=int(x.size),
        **extra,
    )


# ---- sampling ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    samples_ms: np.ndarray
    stop: StopReason
    contention: float = 0.0

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))


def _call_ms(fn: Callable[[], object], returns_ms: bool, clock: Clock) -> float:
    t0 = clock()
    result = fn()
    t1 = clock()
    if not returns_ms:
        return (t1 - t0) * MS_PER_S
    if not isinstance(result, float | int) or isinstance(result, bool) or not math.isfinite(result) or result < 0:
        raise BackendError(f"a device-timed workload must return its time in ms, got {result!r}")
    return float(result)


def warm_up(fn: Callable[[], object], seconds: float, clock: Clock = time.perf_counter) -> int:
    """Call ``fn`` until ``seconds`` of wall time have passed (at least once); return the call count."""
    start = clock()
    calls = 0
    while True:
        fn()
        calls += 1
        if clock() - start >= seconds:
            return calls


def _sample(fn: Callable[[], object], cfg: HarnessConfig, budget_s: float, returns_ms: bool, clock: Clock,
            probe: Probe) -> _Run:
    samples: list[float] = []
    next_check = cfg.min_samples
    mark = probe.mark()
    start = clock()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            samples.append(_call_ms(fn, returns_ms, clock))
            n = len(samples)
            stop = None
            if n >= next_check:
                next_check = n + max(1, n // _CHECK_GROWTH)
                x = np.sort(np.asarray(samples))
                if median_ci_halfwidth(x) <= cfg.target_rel_ci * float(np.median(x)):
                    stop = StopReason.CONVERGED
            if stop is None and n >= cfg.max_samples:
                stop = StopReason.MAX_SAMPLES
            if stop is None and n >= cfg.min_samples and clock() - start >= budget_s:
                stop = StopReason.TIME_CAP
            if stop is not None:
                return _Run(np.asarray(samples), stop, probe.share(mark))
    finally:
        if gc_was_enabled:
            gc.enable()


def _clean(runs: Sequence[_Run], cfg: HarnessConfig) -> list[_Run]:
    """The runs no neighbour hit; all runs when every one was hit (the best there is)."""
    clean = [r for r in runs if r.contention <= cfg.hit_contention]
    return clean or list(runs)


def _settle_gap(runs: Sequence[_Run], cfg: HarnessConfig) -> float:
    """Relative gap between the two lowest clean repeat medians (0 with fewer than two clean repeats)."""
    clean = sorted(r.median_ms for r in runs if r.contention <= cfg.hit_contention)
    return clean[1] / clean[0] - 1.0 if len(clean) >= 2 and clean[0] > 0 else 0.0


def _settled(runs: Sequence[_Run], cfg: HarnessConfig) -> bool:
    clean = sum(r.contention <= cfg.hit_contention for r in runs)
    if clean < min(2, cfg.repeats):
        return False
    return _settle_gap(runs, cfg) <= cfg.settle_rel


def _combine(runs: Sequence[_Run], cfg: HarnessConfig) -> TimingStats:
    medians = [r.median_ms for r in runs]
    spread = max(medians) / min(medians) - 1.0 if min(medians) > 0 else 0.0
    hit = sum(r.contention > cfg.hit_contention for r in runs)
    use = _clean(runs, cfg)
    extra = {"n_repeats": len(runs), "repeat_rel_spread": spread, "runs_hit": hit, "settled": _settled(runs, cfg),
             "repeat_settle_gap": _settle_gap(runs, cfg)}
    if cfg.statistic is RobustStatistic.POOLED:
        not_converged = [r.stop for r in use if r.stop is not StopReason.CONVERGED]
        stop = not_converged[0] if not_converged else StopReason.CONVERGED
        return summarize(np.concatenate([r.samples_ms for r in use]), stop_reason=stop.value,
                         contention=max(r.contention for r in use), **extra)
    order = sorted(range(len(use)), key=lambda i: use[i].median_ms)
    chosen = use[order[0] if cfg.statistic is RobustStatistic.MIN_OF_MEDIANS else order[(len(use) - 1) // 2]]
    return summarize(chosen.samples_ms, stop_reason=chosen.stop.value, contention=chosen.contention, **extra)


def measure_interleaved(
    fns: Sequence[Callable[[], object]],
    config: HarnessConfig | None = None,
    *,
    returns_ms: bool = False,
    clock: Clock = time.perf_counter,
    probe: Probe | None = None,
) -> list[TimingStats]:
    """Time several workloads together, round-robin by repeat; one :class:`TimingStats` per callable.

    Each callable runs its workload once per call. With ``returns_ms`` it returns its own time in ms
    (device timer) and the clock only paces warm-up and the time cap. Repeat ``r`` visits the callables
    rotated by ``r`` so no workload always runs first. Workloads that did not settle get up to
    ``recover_rounds`` more rounds (module docstring, step 5); ``probe`` defaults to the CPU probe on the
    host clock and to none with a fake ``clock`` (tests).
    """
    cfg = config or HarnessConfig.cpu()
    if probe is None:
        probe = CpuProbe() if clock is time.perf_counter else NoProbe()
    runs: list[list[_Run]] = [[] for _ in fns]
    budget_s = cfg.time_cap_s / cfg.repeats

    def one_round(r: int, which: Sequence[int]) -> None:
        for j in range(len(which)):
            i = which[(j + r) % len(which)]
            warm_up(fns[i], cfg.warmup_s if not runs[i] else cfg.rewarm_s, clock)
            runs[i].append(_sample(fns[i], cfg, budget_s, returns_ms, clock, probe))

    for r in range(cfg.repeats):
        one_round(r, range(len(fns)))
    for extra in range(cfg.recover_rounds):
        unsettled = [i for i, rs in enumerate(runs) if not _settled(rs, cfg)]
        if not unsettled:
            break
        logger.debug("recovery round %d: %d workload(s) not settled", extra + 1, len(unsettled))
        one_round(cfg.repeats + extra, unsettled)
    stats = [_combine(rs, cfg) for rs in runs]
    for i, s in enumerate(stats):
        logger.debug("workload %d: median %.4f ms ± %.4f (n=%d, %s, %d of %d runs hit)", i, s.latency_ms_median,
                     s.ci95_halfwidth_ms, s.n_samples, s.stop_reason, s.runs_hit, s.n_repeats)
    return stats


def measure_callable(
    fn: Callable[[], object],
    config: HarnessConfig | None = None,
    *,
    returns_ms: bool = False,
    clock: Clock = time.perf_counter,
    probe: Probe | None = None,
) -> TimingStats:
    """Time one workload with the full protocol (see the module docstring)."""
    return measure_interleaved([fn], config, returns_ms=returns_ms, clock=clock, probe=probe)[0]
