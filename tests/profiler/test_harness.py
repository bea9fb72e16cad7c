"""Timing harness: statistics against numpy/scipy oracles, and the sampling protocol on a fake clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nvit.errors import BackendError
from nvit.profiler.harness import (
    HarnessConfig,
    RobustStatistic,
    StopReason,
    _combine,
    _Run,
    measure_callable,
    measure_interleaved,
    median_ci_halfwidth,
    median_ci_ranks,
    summarize,
    warm_up,
)
from nvit.vocab import DeviceKind

TICK_S = 2.0**-10  # exact in binary, so fake-clock sums compare exactly


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed_fn(clock: FakeClock, durations_s):
    """A workload whose n-th call takes ``durations_s(n)`` seconds of fake time; records its calls."""
    calls: list[float] = []

    def fn() -> None:
        d = durations_s(len(calls))
        calls.append(d)
        clock.now += d

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


# ---- statistics ------------------------------------------------------------------------------------
def test_summarize_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.lognormal(mean=0.0, sigma=0.3, size=257)
    s = summarize(list(x))
    assert s.latency_ms_median == pytest.approx(np.median(x), rel=1e-12)
    assert s.latency_ms_mean == pytest.approx(x.mean(), rel=1e-12)
    assert s.latency_ms_p10 == pytest.approx(np.percentile(x, 10), rel=1e-12)
    assert s.latency_ms_p90 == pytest.approx(np.percentile(x, 90), rel=1e-12)
    assert s.latency_ms_p99 == pytest.approx(np.percentile(x, 99), rel=1e-12)
    assert s.latency_ms_std == pytest.approx(x.std(ddof=1), rel=1e-12)
    assert s.cov == pytest.approx(x.std(ddof=1) / x.mean(), rel=1e-12)
    assert s.n_samples == 257
    assert s.latency_ms_p10 <= s.latency_ms_median <= s.latency_ms_p90 <= s.latency_ms_p99


def test_summarize_small_and_bad_inputs():
    one = summarize([2.5])
    assert (one.latency_ms_median, one.latency_ms_std, one.cov, one.n_samples) == (2.5, 0.0, 0.0, 1)
    assert math.isinf(one.ci95_halfwidth_ms)
    with pytest.raises(BackendError, match="no latency samples"):
        summarize([])
    with pytest.raises(BackendError, match="finite and non-negative"):
        summarize([1.0, -0.5])
    with pytest.raises(BackendError, match="finite and non-negative"):
        summarize([1.0, float("nan")])


def test_median_ci_ranks_known_cases():
    # Tables of distribution-free median CIs: n=10 -> x(2), x(9); n=100 -> x(40), x(61) (1-based).
    assert median_ci_ranks(10) == (1, 8)
    assert median_ci_ranks(100) == (39, 60)
    assert median_ci_ranks(6) == (0, 5)  # coverage 1 - 2/64 = 0.969
    assert median_ci_ranks(5) is None  # best coverage 1 - 2/32 = 0.9375 < 0.95
    assert median_ci_halfwidth(np.arange(1.0, 11.0)) == 3.5  # (x(9) - x(2)) / 2
    assert math.isinf(median_ci_halfwidth(np.arange(5.0)))


@pytest.mark.parametrize("n", [6, 7, 13, 50, 99, 250, 1001])
def test_median_ci_ranks_against_scipy_binomial(n):
    binom = pytest.importorskip("scipy.stats").binom
    lo, hi = median_ci_ranks(n)
    k = lo + 1  # 1-based rank of the lower bound
    assert hi == n - k  # symmetric
    assert 1 - 2 * binom.cdf(k - 1, n, 0.5) >= 0.95  # covers
    assert 1 - 2 * binom.cdf(k, n, 0.5) < 0.95  # and is the narrowest symmetric interval that does


# ---- config ----------------------------------------------------------------------------------------------
def test_config_defaults_validation_and_round_trip():
    cpu, gpu = HarnessConfig.for_device(DeviceKind.CPU), HarnessConfig.for_device(DeviceKind.CUDA)
    assert cpu.repeats > 1 and cpu.statistic is RobustStatistic.MIN_OF_MEDIANS and cpu.target_rel_ci == 0.01
    assert gpu.repeats == 1 and gpu.min_sample_ms > 0
    assert HarnessConfig.from_dict(gpu.to_dict()) == gpu
    assert HarnessConfig.from_dict({"statistic": "pooled"}).statistic is RobustStatistic.POOLED
    with pytest.raises(BackendError, match="unknown harness setting"):
        HarnessConfig.from_dict({"warmup": 1.0})
    with pytest.raises(BackendError, match="max_samples must be >= min_samples"):
        HarnessConfig(min_samples=10, max_samples=5)
    with pytest.raises(BackendError, match="target_rel_ci"):
        HarnessConfig(target_rel_ci=0.0)
    with pytest.raises(BackendError, match="invalid statistic"):
        HarnessConfig(statistic="mean")


# ---- sampling protocol on a fake clock ---------------------------------------------------------------
def test_warm_up_is_time_based_and_calls_at_least_once():
    clock = FakeClock()
    fn = timed_fn(clock, lambda i: TICK_S)
    assert warm_up(fn, 5 * TICK_S, clock) == 5
    assert warm_up(fn, 0.0, clock) == 1


def test_constant_workload_stops_at_min_samples():
    clock = FakeClock()
    fn = timed_fn(clock, lambda i: 4 * TICK_S)
    cfg = HarnessConfig(warmup_s=8 * TICK_S, repeats=1, min_samples=10, max_samples=1000, time_cap_s=10.0)
    s = measure_callable(fn, cfg, clock=clock)
    assert s.stop_reason == StopReason.CONVERGED.value
    assert s.n_samples == 10 and len(fn.calls) == 2 + 10  # two warm-up calls, then the minimum
    assert s.latency_ms_median == pytest.approx(4 * TICK_S * 1e3) and s.ci95_halfwidth_ms == 0.0


def test_noisy_workload_runs_to_the_time_cap_or_max_samples():
    rng = np.random.default_rng(1)
    durations = rng.uniform(1e-3, 3e-3, size=100_000)
    clock = FakeClock()
    fn = timed_fn(clock, lambda i: durations[i])
    cfg = HarnessConfig(warmup_s=0.0, repeats=1, min_samples=10, max_samples=100_000, time_cap_s=0.5)
    s = measure_callable(fn, cfg, clock=clock)
    assert s.stop_reason == StopReason.TIME_CAP.value
    sampled_s = sum(fn.calls[1:])  # the first call was the warm-up
    assert 0.5 <= sampled_s < 0.5 + 3e-3  # stopped by the first sample past the cap
    assert s.ci95_halfwidth_ms > 0.01 * s.latency_ms_median
    clock2 = FakeClock()
    capped = measure_callable(timed_fn(clock2, lambda i: durations[i]), cfg.replace(max_samples=50), clock=clock2)
    assert capped.stop_reason == StopReason.MAX_SAMPLES.value and capped.n_samples == 50


def test_warm_up_samples_are_excluded():
    clock = FakeClock()
    slow_calls = 6
    fn = timed_fn(clock, lambda i: 16 * TICK_S if i < slow_calls else TICK_S)
    cfg = HarnessConfig(warmup_s=slow_calls * 16 * TICK_S, repeats=1, min_samples=10, time_cap_s=10.0)
    s = measure_callable(fn, cfg, clock=clock)
    assert s.latency_ms_p99 == pytest.approx(TICK_S * 1e3)  # no slow call among the samples
    assert len(fn.calls) == slow_calls + s.n_samples


def _levels_by_repeat(levels_ms, warm_calls, rewarm_calls, min_samples):
    """Device-timed fn returning ``levels_ms[r]`` in repeat r (each repeat converges at min_samples) and
    a huge value during warm-up, which must never show up in the statistics."""
    schedule: list[float] = []
    for r, level in enumerate(levels_ms):
        schedule += [1e6] * (warm_calls if r == 0 else rewarm_calls) + [level] * min_samples
    clock = FakeClock()
    calls = []

    def fn() -> float:
        clock.now += TICK_S
        calls.append(1)
        return schedule[len(calls) - 1]

    return fn, clock


@pytest.mark.parametrize(("statistic", "expected_ms"), [
    (RobustStatistic.MIN_OF_MEDIANS, 1.0),
    (RobustStatistic.MEDIAN_OF_MEDIANS, 2.0),
])
def test_robust_statistic_over_repeats(statistic, expected_ms):
    fn, clock = _levels_by_repeat([3.0, 1.0, 2.0], warm_calls=5, rewarm_calls=2, min_samples=10)
    cfg = HarnessConfig(warmup_s=5 * TICK_S, rewarm_s=2 * TICK_S, repeats=3, min_samples=10,
                        time_cap_s=10.0, statistic=statistic, recover_rounds=0)
    s = measure_callable(fn, cfg, returns_ms=True, clock=clock)
    assert s.latency_ms_median == expected_ms and s.latency_ms_p99 == expected_ms
    assert s.n_repeats == 3 and s.n_samples == 10
    assert s.repeat_rel_spread == pytest.approx(3.0 / 1.0 - 1.0)
    assert s.repeat_settle_gap == pytest.approx(2.0 / 1.0 - 1.0)  # what min of medians rests on: the two lowest


def test_combine_pooled_and_stop_reason():
    runs = [_Run(np.array([1.0, 2.0, 3.0]), StopReason.CONVERGED), _Run(np.array([5.0, 6.0]), StopReason.TIME_CAP)]
    pooled = _combine(runs, HarnessConfig(statistic=RobustStatistic.POOLED))
    assert pooled.latency_ms_median == 3.0 and pooled.n_samples == 5 and pooled.stop_reason == "time_cap"
    best = _combine(runs, HarnessConfig(statistic=RobustStatistic.MIN_OF_MEDIANS))
    assert best.latency_ms_median == 2.0 and best.stop_reason == "converged"


def test_interleaving_is_round_robin_with_rotation():
    clock = FakeClock()
    order: list[str] = []

    def make(name):
        def fn():
            clock.now += TICK_S
            if not order or order[-1] != name:
                order.append(name)
        return fn

    cfg = HarnessConfig(warmup_s=TICK_S, rewarm_s=TICK_S, repeats=2, min_samples=10, time_cap_s=10.0)
    stats = measure_interleaved([make("A"), make("B"), make("C")], cfg, clock=clock)
    assert order == ["A", "B", "C", "B", "C", "A"]
    assert [s.n_repeats for s in stats] == [2, 2, 2]


def test_device_timed_fn_must_return_ms():
    cfg = HarnessConfig(warmup_s=0.0, repeats=1, min_samples=1, time_cap_s=1.0)
    with pytest.raises(BackendError, match="must return its time in ms"):
        measure_callable(lambda: None, cfg, returns_ms=True)


def test_real_clock_smoke():
    cfg = HarnessConfig(warmup_s=0.01, rewarm_s=0.0, repeats=2, min_samples=10, time_cap_s=0.1)
    s = measure_callable(lambda: sum(range(2000)), cfg)
    assert 0 < s.latency_ms_p10 <= s.latency_ms_median <= s.latency_ms_p90 and s.n_samples >= 10


def test_a_partial_harness_dict_overrides_only_its_keys_on_the_device_defaults():
    from nvit.profiler.base import get_backend
    from nvit.vocab import Precision

    gpu = get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1,
                               harness={"time_cap_s": 1.0})
    assert gpu.harness == HarnessConfig.gpu().replace(time_cap_s=1.0)
    assert gpu.harness.min_sample_ms == 1.0 and gpu.harness.repeats == 1  # not the CPU's 0 and 3
    cpu = get_backend("torch")(device=DeviceKind.CPU, precision=Precision.FP32, batch_size=1,
                               harness={"time_cap_s": 1.0})
    assert cpu.harness == HarnessConfig.cpu().replace(time_cap_s=1.0)
    with pytest.raises(BackendError, match="unknown harness setting"):
        get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, harness={"cap": 1})
