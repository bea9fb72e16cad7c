"""Time left in a long loop: seconds per step from a moving window of recent steps, and durations in words."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

#: Steps timed before an ETA is worth printing.
FEW_STEPS = 5


class StepClock:
    """Seconds per step over the last ``window_steps`` steps, from the time between calls to :meth:`tick`.

    Call :meth:`tick` after every step. The first call only starts the clock: the first step's time (model
    warm-up, the data loader's start) is never counted, nor is anything before it.
    """

    def __init__(self, window_steps: int, clock: Callable[[], float] = time.monotonic) -> None:
        if window_steps < 1:
            raise ValueError(f"window_steps must be positive, got {window_steps}")
        self._times: deque[float] = deque(maxlen=window_steps + 1)
        self._clock = clock
        self.timed_steps = 0  # steps timed since the clock started (not only those in the window)

    def tick(self) -> None:
        if self._times:
            self.timed_steps += 1
        self._times.append(self._clock())

    @property
    def seconds_per_step(self) -> float | None:
        """Mean step time over the window, or None before any step is timed."""
        if len(self._times) < 2:
            return None
        return (self._times[-1] - self._times[0]) / (len(self._times) - 1)

    def eta_seconds(self, remaining_steps: int) -> float | None:
        per_step = self.seconds_per_step
        return None if per_step is None else max(0, remaining_steps) * per_step


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``7 h 05 min`` or ``3 d 4 h``: a rounded duration for ETAs."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite non-negative number, got {seconds!r}")
    if seconds < 90:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    if minutes < 48 * 60:
        hours, rest = divmod(minutes, 60)
        return f"{hours} h {rest:02d} min"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h"
