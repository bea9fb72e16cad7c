"""Measurement conditions: a busy neighbour is detected, a quiet machine is not, the harness re-measures what
a neighbour hit, and the verdicts reach tables and reports."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import lut_fakes as fk
import pytest

from nvit.profiler.conditions import (
    Conditions,
    ConditionsMonitor,
    Verdict,
    judge,
    merge_sessions,
    run_delay_s,
)
from nvit.profiler.harness import HarnessConfig, measure_callable, measure_interleaved

linux = pytest.mark.skipif(run_delay_s() is None, reason="needs /proc/<pid>/task/*/schedstat (Linux)")


def _workload() -> None:  # a short pure-Python loop: about 0.2 ms of one core
    sum(i * i for i in range(2000))


@linux
def test_a_busy_neighbour_during_a_short_measurement_is_detected() -> None:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        time.sleep(0.3)
        with ConditionsMonitor() as monitor:
            # each run samples its whole 0.2 s budget (no early convergence), so it spans many scheduler slices
            stats = measure_callable(_workload, HarnessConfig(warmup_s=0.05, time_cap_s=0.6, repeats=3,
                                                              target_rel_ci=1e-9, max_samples=100_000))
        c = monitor.conditions()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    # more spinners than cores: this thread waits for a CPU for a large share of its time
    assert c.contention is not None and c.contention > 0.2
    assert c.other_cpu is not None and c.other_cpu > 0.5
    assert c.verdict in (Verdict.NOISY, Verdict.UNUSABLE)
    assert any("waited for a CPU" in r for r in c.reasons)
    assert stats.runs_hit >= 1
    # the reported run is one no neighbour hit, unless every run was hit
    assert stats.contention <= HarnessConfig().hit_contention or stats.runs_hit == stats.n_repeats


@linux
def test_a_quiet_machine_is_not_flagged() -> None:
    with ConditionsMonitor() as monitor:
        measure_callable(_workload, HarnessConfig(warmup_s=0.05, time_cap_s=0.6, repeats=3))
    c = monitor.conditions()
    if c.other_cpu is not None and c.other_cpu > 0.10:
        pytest.skip(f"this machine is not quiet now (other processes {100 * c.other_cpu:.0f}% of the CPU)")
    assert c.contention is not None and c.contention < 0.02
    assert c.verdict is Verdict.QUIET and c.reasons == ()


def test_verdicts_follow_the_figures_and_round_trip() -> None:
    quiet = judge(Conditions(Verdict.QUIET, other_cpu=0.01, contention=0.001, sentinel_drift=0.02))
    assert quiet.verdict is Verdict.QUIET
    noisy = judge(Conditions(Verdict.QUIET, other_cpu=0.5, contention=0.001, sentinel_drift=0.02))
    assert noisy.verdict is Verdict.NOISY and noisy.reasons == ("other processes used 50.0%",)
    bad = judge(Conditions(Verdict.QUIET, contention=0.4, sentinel_drift=-0.3))
    assert bad.verdict is Verdict.UNUSABLE and len(bad.reasons) == 2
    gpu = judge(Conditions(Verdict.QUIET, gpu={"sm_clock_mhz": 1200.0, "sm_clock_max_mhz": 1980.0,
                                               "other_processes": 1}))
    assert gpu.verdict is Verdict.NOISY and len(gpu.reasons) == 2
    assert Conditions.from_dict(bad.to_dict()) == bad
    merged = merge_sessions([{"wall_s": 30.0, "other_cpu": 0.0, "contention": 0.0},
                             {"wall_s": 10.0, "other_cpu": 0.4, "contention": 0.0}], sentinel_drift=0.01)
    assert merged.other_cpu == pytest.approx(0.1) and merged.verdict is Verdict.NOISY


class ScriptedProbe:
    """Reports a contention for each sampling run in turn (then 0)."""

    def __init__(self, shares: list[float]) -> None:
        self.shares = list(shares)

    def mark(self) -> None:
        return None

    def share(self, since: object) -> float:
        return self.shares.pop(0) if self.shares else 0.0


def test_a_run_a_neighbour_hit_does_not_decide_and_is_re_measured() -> None:
    cfg = HarnessConfig(warmup_s=0.0, rewarm_s=0.0, min_samples=10, max_samples=10, time_cap_s=1.0, repeats=3)
    medians = iter([0.7, 1.0, 1.01, 1.0])  # the first run is fast *and* hit (a clock glitch): ignored
    current = {"v": next(medians)}

    class Probe(ScriptedProbe):
        def share(self, since: object) -> float:
            out = super().share(since)
            current["v"] = next(medians, 1.0)
            return out

    stats = measure_interleaved([lambda: current["v"]], cfg, returns_ms=True, probe=Probe([0.5, 0.0, 0.0]))[0]
    assert stats.latency_ms_median == pytest.approx(1.0) and stats.runs_hit == 1 and stats.settled
    assert stats.n_repeats == 3  # two clean runs agreeing within 3%: no extra round


def test_unsettled_workloads_get_extra_rounds_then_say_so() -> None:
    cfg = HarnessConfig(warmup_s=0.0, rewarm_s=0.0, min_samples=10, max_samples=10, time_cap_s=1.0, repeats=3,
                        recover_rounds=2)
    calls = {"n": 0}

    def fn() -> float:
        calls["n"] += 1
        return 1.0

    # every run hit: never settled, so both extra rounds are spent, and the stats say it
    stats = measure_interleaved([fn], cfg, returns_ms=True, probe=ScriptedProbe([0.5] * 10))[0]
    assert stats.n_repeats == 5 and stats.runs_hit == 5 and not stats.settled
    # two workloads, one disturbed in its first two runs: only it gets an extra round
    shares = [0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # A0 B0 | B1 A1 | A2 B2 | B3
    a, b = (measure_interleaved([lambda: 1.0, lambda: 2.0], cfg, returns_ms=True, probe=ScriptedProbe(shares)))
    assert a.n_repeats == 3 and b.n_repeats == 4 and a.settled and b.settled and b.runs_hit == 2


def test_measure_passes_re_times_models_whose_passes_disagree() -> None:
    from nvit.validation.compare import measure_passes

    class Backend:
        def __init__(self) -> None:
            self.rounds: list[list[str]] = []

        def measure_many(self, workloads):
            self.rounds.append(list(workloads))
            n = len(self.rounds)
            slow = {"a": 1.0, "b": 1.3 if n == 1 else 1.0, "c": 1.0 + 0.2 * (n - 1)}  # c slows every pass
            return [fk.stats({"a": 1.0, "b": 2.0, "c": 3.0}[w] * slow[w]) for w in workloads]

    be = Backend()
    a, b, c = measure_passes(be, ["a", "b", "c"], passes=2, extra_passes=2)
    # b's slow first pass leaves its two passes 30% apart: one extra pass settles it; c never settles
    assert be.rounds[2:] == [["b", "c"], ["c"]]
    assert a.latency_ms_median == 1.0 and b.latency_ms_median == 2.0 and c.latency_ms_median == 3.0
    assert a.settled and b.settled and not c.settled
    assert c.n_repeats == 4 * 3
