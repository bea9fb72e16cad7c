"""``nvit prune``'s plan line, its warning when the pace means many epochs, and its progress bar (total, ETA)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from nvit.progress import FEW_STEPS, StepClock, format_duration
from nvit.pruning.schedule import PruneSchedule

#: Steps of the ETA's moving window (rounded up to whole intervals, so that it counts pruning steps fairly).
ETA_WINDOW_STEPS = 50
STEADY_COLUMNS = 62  # "prune", a bar of 16, "50000/50000", "ETA ~10 h 05 min", "0:00:37" and the gaps
README_SECTION = "README, 'How long pruning takes'"


def plan_line(schedule: PruneSchedule, dataset_size: int, batch_size: int, unit: str) -> str:
    """One line: the pruning steps and training steps the pace implies, and how many epochs of the data."""
    s = schedule
    text = (f"plan: about {s.total_steps:,} training steps ({s.pruning_steps:,} pruning steps every "
            f"{s.interval_steps:,}, pace {100 * s.pace:.3g}% of {s.start_latency_ms:.4g} {unit} each)")
    if s.epochs is not None:
        text += (f" = {_epochs(s.epochs)} epochs of the training data ({dataset_size:,} items, "
                 f"{s.steps_per_epoch:,} batches of {batch_size:,})")
    return text + "; ETA once a few steps are timed"


def epochs_warning(schedule: PruneSchedule) -> str | None:
    """A warning when the plan is many epochs of the data (a small data set at an ImageNet pace)."""
    from nvit.pruning.config import DEFAULT_INTERVAL, DEFAULT_PACE  # not at import: --help imports no torch

    if not schedule.many_epochs or schedule.epochs is None:
        return None
    default = schedule.pace == DEFAULT_PACE and schedule.interval_steps == DEFAULT_INTERVAL
    which = "the default pace (NViT's, set for ImageNet)" if default else "this pace"
    return (f"warning: {which} needs about {schedule.total_steps:,} training steps = {_epochs(schedule.epochs)} "
            f"epochs of this data set; for a small data set raise --pace or lower --interval ({README_SECTION})")


def _steady() -> Column:
    return Column(no_wrap=True)


def _epochs(epochs: float) -> str:
    return f"{epochs:,.1f}" if epochs < 10 else f"{round(epochs):,}"


class PruneProgress:
    """The bar: training steps done of the estimated total, the loop's status, and an ETA from the recent
    step time. The total is re-estimated at every step (:meth:`PruneSchedule.total_steps_from`), so it
    converges on the run's true length."""

    def __init__(self, schedule: PruneSchedule, console: Console, unit: str, *, disable: bool = False) -> None:
        self.schedule, self.console, self.unit = schedule, console, unit
        window = schedule.interval_steps * math.ceil(ETA_WINDOW_STEPS / schedule.interval_steps)
        self.clock = StepClock(window)
        self.eta_said = False
        # the bar, steps, ETA and clock keep their width (about 60 columns); the status gets the rest
        status = Column(no_wrap=True, overflow="ellipsis", max_width=max(10, console.width - STEADY_COLUMNS))
        columns = (TextColumn("[bold]prune"), BarColumn(bar_width=16, table_column=_steady()),
                   MofNCompleteColumn(table_column=_steady()), TextColumn("{task.fields[eta]}", table_column=_steady()),
                   TimeElapsedColumn(table_column=_steady()), TextColumn("{task.fields[status]}", table_column=status))
        self.bar = Progress(*columns, console=console, transient=False, disable=disable)
        self.task = self.bar.add_task("prune", total=schedule.total_steps, status="starting", eta="ETA …")

    def __enter__(self) -> PruneProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def on_step(self, r: Any) -> None:
        """Show a :class:`~nvit.pruning.results.StepReport`."""
        self.clock.tick()
        done = r.step + 1
        total = self.schedule.total_steps_from(done, r.predicted_latency_ms)
        eta = self.clock.eta_seconds(total - done)
        target = "" if r.next_target_ms is None else f" → {r.next_target_ms:.4g}"
        status = (f"pred {r.predicted_latency_ms:.4g}{target} {self.unit}  pruned {r.pruned_groups}  "
                  f"loss {r.loss:.3f}  acc {100 * r.accuracy:.1f}%")
        self.bar.update(self.task, completed=done, total=total, status=status,
                        eta="ETA …" if eta is None else f"ETA ~{format_duration(eta)}")
        if r.saved:
            self.bar.console.print(f"saved [bold]{r.saved}[/] at step {r.step}: {r.predicted_latency_ms:.4g} "
                                   f"{self.unit}")
        if not self.eta_said and eta is not None and self.clock.timed_steps >= FEW_STEPS:
            self.eta_said = True
            self.bar.console.print(eta_line(self.clock.seconds_per_step or 0.0, self.clock.timed_steps,
                                            total - done))


def eta_line(seconds_per_step: float, timed_steps: int, remaining_steps: int) -> str:
    return (f"timed {timed_steps} steps: {seconds_per_step:.3g} s/step, about "
            f"{format_duration(seconds_per_step * remaining_steps)} for the remaining ~{remaining_steps:,} steps "
            "here (an estimate: the bar's total and ETA follow the run)")
