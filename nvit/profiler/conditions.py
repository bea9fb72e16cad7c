"""The conditions of a measurement: was the machine quiet while nvit timed something?

Two kinds of evidence, both read from the kernel (Linux; elsewhere the fields stay ``None``):

- **contention** of the measuring process: the time its threads spent *runnable but waiting for a CPU*
  (``run_delay`` in ``/proc/<pid>/task/*/schedstat``, nanoseconds), as a share of wall time. It is precise
  over a few milliseconds, so the harness reads it around every sampling run (:class:`CpuProbe`) and treats a
  run with a high share as hit by a neighbour (DESIGN.md §4);
- **the machine**: the share of all cores' time used by *other* processes (``/proc/stat`` busy time minus
  this process's CPU time), the hypervisor's ``steal`` share (another guest on the host), the load average,
  the CPU clock range and thermal-throttle events where ``/sys`` exposes them, and on a GPU its SM clock
  against its maximum and the other processes using it (``nvidia-smi``, when present).

:class:`ConditionsMonitor` spans one measuring command; :func:`judge` turns its numbers (and the
measurement's own spread and sentinel drift) into a :class:`Verdict` with the reasons behind it.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_PROC = Path("/proc")
_CPU_SYS = Path("/sys/devices/system/cpu")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


class Verdict(str, enum.Enum):
    """How far a measurement can be trusted: ``quiet`` (nothing disturbed it), ``noisy`` (disturbed; its
    figures are marked), ``unusable`` (too disturbed to decide anything)."""

    QUIET = "quiet"
    NOISY = "noisy"
    UNUSABLE = "unusable"

    @property
    def rank(self) -> int:
        return list(Verdict).index(self)

    @classmethod
    def worst(cls, verdicts: Sequence[Verdict | str]) -> Verdict:
        return max((cls(v) for v in verdicts), key=lambda v: v.rank, default=cls.QUIET)


@dataclass(frozen=True)
class ConditionLimits:
    """Where quiet ends (``*_noisy``) and where a measurement stops being usable (``*_unusable``).

    Shares are fractions: ``contention`` of wall time the measuring threads waited for a CPU; ``other_cpu`` of
    all cores' time used by other processes; ``steal`` of all cores' time taken by the hypervisor. ``drift``
    is the sentinel's largest relative change, ``spread`` the median over workloads of the gap between a
    workload's two lowest clean repeat medians (what a minimum of medians rests on; one slow repeat of three
    does not count).
    """

    contention_noisy: float = 0.02
    contention_unusable: float = 0.25
    other_cpu_noisy: float = 0.10
    other_cpu_unusable: float = 0.75
    steal_noisy: float = 0.02
    steal_unusable: float = 0.20
    drift_noisy: float = 0.05
    drift_unusable: float = 0.25
    spread_noisy: float = 0.05
    spread_unusable: float = 0.25
    gpu_clock_noisy: float = 0.90  # SM clock below this fraction of its maximum while measuring


DEFAULT_LIMITS = ConditionLimits()


# ---- counters ----------------------------------------------------------------------------------------
def run_delay_s(pid: int | str = "self") -> float | None:
    """Seconds this process's threads have waited, runnable, for a CPU (``None`` where unexposed)."""
    total = 0
    try:
        for task in os.listdir(_PROC / str(pid) / "task"):
            try:
                total += int((_PROC / str(pid) / "task" / task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):  # a thread that just ended
                continue
    except OSError:
        return None
    return total / 1e9


def machine_cpu_s() -> tuple[float, float] | None:
    """Busy and steal seconds of all cores since boot (``/proc/stat``), or ``None``."""
    try:
        values = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) * _TICK_S, steal * _TICK_S


def cpu_clock_mhz() -> list[float]:
    """Current clock of every core that exposes one (often none inside a VM)."""
    out = []
    for path in sorted(_CPU_SYS.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            out.append(int(path.read_text()) / 1e3)
        except (OSError, ValueError):
            continue
    return out


def throttle_events() -> int | None:
    """Thermal-throttle events of all cores so far, where the kernel counts them."""
    paths = list(_CPU_SYS.glob("cpu[0-9]*/thermal_throttle/*_throttle_count"))
    if not paths:
        return None
    total = 0
    for path in paths:
        try:
            total += int(path.read_text())
        except (OSError, ValueError):
            continue
    return total


def gpu_state(index: int = 0) -> dict[str, Any] | None:
    """SM clock, its maximum, and the count of compute processes on GPU ``index`` (``nvidia-smi``), or ``None``."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        q = subprocess.run([smi, f"--id={index}", "--query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,"
                            "clocks_throttle_reasons.active", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip().split(", ")
        apps = subprocess.run([smi, f"--id={index}", "--query-compute-apps=pid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    own = str(os.getpid())
    try:
        return {"sm_clock_mhz": float(q[0]), "sm_clock_max_mhz": float(q[1]), "temperature_c": float(q[2]),
                "throttle_reasons": q[3], "other_processes": sum(1 for p in apps if p != own)}
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    own_cpu_s: float
    run_delay_s: float | None
    machine: tuple[float, float] | None
    throttle: int | None

    @classmethod
    def take(cls) -> Snapshot:
        return cls(time.monotonic(), time.process_time(), run_delay_s(), machine_cpu_s(), throttle_events())


class Probe(Protocol):
    """Reads how contended the measuring process was between ``mark()`` and ``share(mark)`` (a share of
    wall time; :class:`CpuProbe`)."""

    def mark(self) -> Any: ...

    def share(self, since: Any) -> float: ...


class NoProbe:
    """A probe that sees no contention (fake clocks in tests, device timers)."""

    def mark(self) -> None:
        return None

    def share(self, since: Any) -> float:
        return 0.0


class CpuProbe:
    """Contention of this process between two moments: the share of wall time its threads waited for a CPU.
    The harness reads it around every sampling run (``mark`` before, ``share`` after)."""

    def mark(self) -> tuple[float, float | None]:
        return time.monotonic(), run_delay_s()

    def share(self, since: tuple[float, float | None]) -> float:
        t0, d0 = since
        d1 = run_delay_s()
        wall = time.monotonic() - t0
        if d0 is None or d1 is None or wall <= 0:
            return 0.0
        return max(0.0, d1 - d0) / wall


# ---- conditions and verdict ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Conditions:
    """What the machine was doing while a command measured, the verdict, and the reasons for it."""

    verdict: Verdict
    reasons: tuple[str, ...] = ()
    wall_s: float = 0.0
    contention: float | None = None
    other_cpu: float | None = None
    steal: float | None = None
    load_avg_1m: float | None = None
    cpu_clock_mhz: tuple[float, float] | None = None  # lowest and highest seen
    throttle_events: int | None = None
    gpu: dict[str, Any] | None = None
    sentinel_drift: float | None = None
    repeat_spread: float | None = None
    runs_hit: float | None = None  # share of sampling runs the harness saw contended
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        out["reasons"] = list(self.reasons)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conditions:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["verdict"] = Verdict(known.get("verdict", "quiet"))
        known["reasons"] = tuple(known.get("reasons") or ())
        if known.get("cpu_clock_mhz") is not None:
            known["cpu_clock_mhz"] = tuple(known["cpu_clock_mhz"])
        return cls(**known)

    def summary(self) -> str:
        """One line: the verdict, then why (or the main figures when quiet)."""
        if self.reasons:
            return f"{self.verdict.value}: {'; '.join(self.reasons)}"
        figures = []
        if self.other_cpu is not None:
            figures.append(f"other processes {100 * self.other_cpu:.0f}% of the CPU")
        if self.contention is not None:
            figures.append(f"waited for a CPU {100 * self.contention:.1f}% of the time")
        if self.sentinel_drift is not None:
            figures.append(f"sentinel drift {100 * self.sentinel_drift:.1f}%")
        return f"{self.verdict.value}" + (f" ({', '.join(figures)})" if figures else "")


def _grade(value: float | None, noisy: float, unusable: float, what: str) -> tuple[Verdict, str | None]:
    if value is None or abs(value) < noisy:
        return Verdict.QUIET, None
    verdict = Verdict.UNUSABLE if abs(value) >= unusable else Verdict.NOISY
    return verdict, f"{what} {100 * value:.1f}%"


def judge(c: Conditions, limits: ConditionLimits = DEFAULT_LIMITS) -> Conditions:
    """``c`` with its verdict and reasons set from its figures (the worst figure decides)."""
    L = limits
    graded = [
        _grade(c.contention, L.contention_noisy, L.contention_unusable, "the measurement waited for a CPU"),
        _grade(c.other_cpu, L.other_cpu_noisy, L.other_cpu_unusable, "other processes used"),
        _grade(c.steal, L.steal_noisy, L.steal_unusable, "hypervisor steal"),
        _grade(c.sentinel_drift, L.drift_noisy, L.drift_unusable, "sentinel drift"),
        _grade(c.repeat_spread, L.spread_noisy, L.spread_unusable, "median gap between a model's two best repeats"),
    ]
    if c.throttle_events:
        graded.append((Verdict.NOISY, f"{c.throttle_events} thermal-throttle events"))
    if c.cpu_clock_mhz and c.cpu_clock_mhz[0] < 0.9 * c.cpu_clock_mhz[1]:
        graded.append((Verdict.NOISY, f"CPU clock varied {c.cpu_clock_mhz[0]:.0f}-{c.cpu_clock_mhz[1]:.0f} MHz"))
    gpu = c.gpu or {}
    if gpu.get("other_processes"):
        graded.append((Verdict.NOISY, f"{gpu['other_processes']} other process(es) on the GPU"))
    if gpu.get("sm_clock_max_mhz") and gpu["sm_clock_mhz"] < L.gpu_clock_noisy * gpu["sm_clock_max_mhz"]:
        graded.append((Verdict.NOISY, f"GPU SM clock {gpu['sm_clock_mhz']:.0f} of {gpu['sm_clock_max_mhz']:.0f} MHz"))
    verdict = Verdict.worst([v for v, _ in graded])
    reasons = tuple(r for v, r in graded if r is not None)
    return Conditions(**{**c.__dict__, "verdict": verdict, "reasons": reasons})


class ConditionsMonitor:
    """Watch the machine while a command measures: ``with ConditionsMonitor() as m: ...; m.conditions(...)``.

    ``gpu_index`` also samples that GPU at the start and the end (the lower clock is kept).
    """

    def __init__(self, *, gpu_index: int | None = None) -> None:
        self.gpu_index = gpu_index
        self._start: Snapshot | None = None
        self._end: Snapshot | None = None
        self._clocks: list[float] = []
        self._gpu: list[dict[str, Any]] = []

    def __enter__(self) -> ConditionsMonitor:
        self._start = Snapshot.take()
        self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sample(self) -> None:
        self._clocks += cpu_clock_mhz()
        if self.gpu_index is not None and (state := gpu_state(self.gpu_index)) is not None:
            self._gpu.append(state)

    def stop(self) -> None:
        if self._end is None:
            self._sample()
            self._end = Snapshot.take()

    def conditions(self, *, sentinel_drift: float | None = None, repeat_spread: float | None = None,
                   runs_hit: float | None = None, limits: ConditionLimits = DEFAULT_LIMITS) -> Conditions:
        """The judged conditions from the start to now (or to :meth:`stop`), plus the measurement's own figures."""
        a = self._start or Snapshot.take()
        b = self._end or Snapshot.take()
        wall = max(b.wall_s - a.wall_s, 1e-9)
        cores = os.cpu_count() or 1
        other = steal = contention = None
        if a.machine and b.machine:
            other = max(0.0, b.machine[0] - a.machine[0] - (b.own_cpu_s - a.own_cpu_s)) / (wall * cores)
            steal = (b.machine[1] - a.machine[1]) / (wall * cores)
        if a.run_delay_s is not None and b.run_delay_s is not None:
            contention = (b.run_delay_s - a.run_delay_s) / wall
        throttle = b.throttle - a.throttle if a.throttle is not None and b.throttle is not None else None
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        gpu = min(self._gpu, key=lambda g: g["sm_clock_mhz"]) if self._gpu else None
        if gpu is not None:
            gpu = {**gpu, "other_processes": max(g["other_processes"] for g in self._gpu)}
        clocks = (min(self._clocks), max(self._clocks)) if self._clocks else None
        return judge(Conditions(Verdict.QUIET, (), wall, contention, other, steal, load, clocks, throttle, gpu,
                                sentinel_drift, repeat_spread, runs_hit), limits)


def merge_sessions(sessions: Sequence[Mapping[str, Any]], **figures: Any) -> Conditions:
    """One judged :class:`Conditions` for a measurement made in several sessions (a resumed sweep): shares
    weighted by each session's wall time, the highest load, every throttle event; ``figures`` are the
    measurement's own (sentinel drift, repeat spread, runs hit)."""
    wall = sum(float(s.get("wall_s") or 0.0) for s in sessions)

    def mean(key: str) -> float | None:
        have = [(float(s["wall_s"]), float(s[key])) for s in sessions if s.get(key) is not None and s.get("wall_s")]
        total = sum(w for w, _ in have)
        return sum(w * v for w, v in have) / total if have and total > 0 else None

    loads = [s["load_avg_1m"] for s in sessions if s.get("load_avg_1m") is not None]
    throttles = [s["throttle_events"] for s in sessions if s.get("throttle_events") is not None]
    clocks = [c for s in sessions if s.get("cpu_clock_mhz") for c in s["cpu_clock_mhz"]]
    gpus = [s["gpu"] for s in sessions if s.get("gpu")]
    gpu = min(gpus, key=lambda g: g.get("sm_clock_mhz", 0.0)) if gpus else None
    merged = Conditions(Verdict.QUIET, (), wall, mean("contention"), mean("other_cpu"), mean("steal"),
                        max(loads) if loads else None, (min(clocks), max(clocks)) if clocks else None,
                        sum(throttles) if throttles else None, gpu, extra={"sessions": len(sessions)}, **figures)
    return judge(merged)


def sweep_conditions(sessions: Sequence[Mapping[str, Any]], sentinels: Sequence[Mapping[str, Any]],
                     parts: Sequence[Mapping[str, Any]]) -> Conditions:
    """A profiled table's conditions from its journal: the sessions' machine figures, the sentinel's largest
    drift, the median spread of the parts' repeats and the share of parts a neighbour hit."""
    import statistics

    stats = [p["stats"] for p in parts]
    drift = max((abs(float(s["drift"])) for s in sentinels), default=None)
    spread = (statistics.median(float(s.get("repeat_settle_gap", s.get("repeat_rel_spread", 0.0))) for s in stats)
              if stats else None)
    hit = sum(1 for s in stats if s.get("runs_hit")) / len(stats) if stats else None
    return merge_sessions(sessions, sentinel_drift=drift, repeat_spread=spread, runs_hit=hit)
