"""How far a comparison's figures can be trusted: noisy rows, measured orders that contradict the predicted
one by more than the noise, and one verdict for the whole report.

A row is *noisy* when its own measurement says so (:func:`nvit.validation.compare.row_noise`): its passes never
agreed, or every sampling run of it waited for a CPU. Two models are in *conflict* when the table predicts
one clearly faster (by more than both measurements' uncertainty) and it measured clearly slower. The
report's verdict is the worst of the machine's (:mod:`nvit.profiler.conditions`), ``noisy`` when a row is
noisy or the table's own rows re-timed beside the models drifted by more than 5% since profiling
(:mod:`nvit.validation.drift`), and ``unusable`` when an order conflict coincides with a machine that was not
quiet.

**Twins.** Models of the same architecture (two seeds of one pruning method often land on the same widths) must
measure the same in one session. When they do not, by more than both measurements' uncertainty and
:data:`TWIN_AGREE_REL`, the host changed speed between them, whatever the process counters said (the noise of a
shared VM shows in nothing but the timings): the verdict is ``noisy`` and the line names the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nvit.errors import NvitError
from nvit.profiler.conditions import Conditions, Verdict
from nvit.validation.drift import DRIFT_NOTICE, DriftCorrection

#: Two measurements of one architecture in one session that differ by more than this (and their uncertainty)
#: show the host changing speed.
TWIN_AGREE_REL = 0.05


class UntrustedMeasurement(NvitError):
    """``--strict``: the measurements were not quiet enough to be trusted."""


@dataclass(frozen=True)
class Trust:
    verdict: Verdict
    noisy_rows: tuple[str, ...]
    conflicts: tuple[str, ...]
    machine: str  # the machine's conditions, one line
    drift: str = ""  # how far the machine drifted since the table was profiled, when it did by more than 5%
    twins: tuple[str, ...] = ()  # models of one architecture that measured apart (module doc)

    def line(self) -> str:
        """One line: the verdict and what it rests on."""
        parts = []
        if self.drift:
            parts.append(self.drift)
        if self.noisy_rows:
            parts.append(f"{len(self.noisy_rows)} row(s) noisy ({', '.join(self.noisy_rows)})")
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} measured order(s) contradict the prediction")
        if self.twins:
            parts.append("; ".join(self.twins))
        parts.append(f"machine {self.machine}")
        advice = {Verdict.QUIET: "the figures can be trusted",
                  Verdict.NOISY: "treat the marked figures with care; re-run on a quiet machine to confirm",
                  Verdict.UNUSABLE: "do not rely on these figures; re-run on a quiet machine"}[self.verdict]
        return f"measurements {self.verdict.value}: {'; '.join(parts)} — {advice}"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "noisy_rows": list(self.noisy_rows), "conflicts": list(self.conflicts),
                "machine": self.machine, "drift": self.drift, "twins": list(self.twins), "line": self.line()}

    def enforce(self, strict: bool) -> None:
        """With ``strict``, anything but quiet is an error (the figures are saved first by the caller)."""
        if strict and self.verdict is not Verdict.QUIET:
            raise UntrustedMeasurement(f"--strict: {self.line()}")


def order_conflicts(results: Sequence[Any]) -> list[str]:
    """Pairs whose measured order contradicts the predicted order by more than the measurement noise."""
    out = []
    for a in results:
        for b in results:
            margin = (a.uncertainty_pct + b.uncertainty_pct) / 100.0
            if a.predicted_ms < b.predicted_ms * (1.0 - margin) and a.measured_ms > b.measured_ms * (1.0 + margin):
                out.append(f"{a.name} measured slower than {b.name} ({a.measured_ms:.4g} vs {b.measured_ms:.4g} ms) "
                           f"though predicted {100 * (1 - a.predicted_ms / b.predicted_ms):.0f}% faster")
    return out


def architecture_key(result: Any) -> str | None:
    """What makes two results one architecture: their ``arch`` without its name (``None``: no arch)."""
    arch = getattr(result, "arch", None)
    if not arch:
        return None
    return repr(sorted((k, v) for k, v in arch.items() if k != "name"))


def twin_disagreements(results: Sequence[Any]) -> list[str]:
    """Models of one architecture whose measurements in one session differ beyond their noise (module doc): the
    fastest and the slowest of each such group."""
    groups: dict[str, list[Any]] = {}
    for r in results:
        key = architecture_key(r)
        if key is not None:
            groups.setdefault(key, []).append(r)
    out = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        fast, slow = min(rows, key=lambda r: r.measured_ms), max(rows, key=lambda r: r.measured_ms)
        margin = max(TWIN_AGREE_REL, (fast.uncertainty_pct + slow.uncertainty_pct) / 100.0)
        if slow.measured_ms > fast.measured_ms * (1.0 + margin):
            out.append(f"{fast.name} and {slow.name}, one architecture, measured {fast.measured_ms:.4g} and "
                       f"{slow.measured_ms:.4g} ms ({100 * (slow.measured_ms / fast.measured_ms - 1):.0f}% apart)")
    return out


def judge_report(report: Any) -> Trust:
    cond = report.context.get("conditions")
    machine = Conditions.from_dict(cond) if cond else None
    noisy = tuple(r.name for r in report.results if r.noisy)
    conflicts = tuple(order_conflicts(report.results))
    twins = tuple(twin_disagreements(report.results))
    verdicts = [machine.verdict if machine else Verdict.QUIET]
    if noisy or conflicts or twins:
        verdicts.append(Verdict.NOISY)
    if conflicts and machine is not None and machine.verdict is not Verdict.QUIET:
        verdicts.append(Verdict.UNUSABLE)
    drift = DriftCorrection.from_dict(report.context.get("drift"))
    drift_line = ""
    if abs(drift.largest_pct) > 100 * DRIFT_NOTICE:
        verdicts.append(Verdict.NOISY)
        corrected = [abs(r.error_pct_drift_corrected) for r in report.results
                     if r.error_pct_drift_corrected is not None]
        drift_line = (f"the machine drifted up to {drift.largest_pct:+.0f}% since the table was profiled "
                      f"({drift.summary()})")
        if corrected:
            drift_line += f"; drift-corrected errors up to {max(corrected):.1f}%"
    return Trust(Verdict.worst(verdicts), noisy, conflicts, machine.summary() if machine else "not watched",
                 drift_line, twins)
