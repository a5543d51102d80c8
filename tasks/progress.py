"""Progress of long work (embedding) as numbers a person can act on: done of total, rate, time left.

A terminal gets a tqdm bar; a Prefect run cannot see one (its tasks run without a terminal, and a
bar is not a log line), so the same measurements also reach a callback, at most once every few
seconds: the refresh flow logs them and moves its progress artifact with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from storage.timing import duration


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units after `elapsed_s` seconds."""

    done: int
    total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)

    @property
    def rate(self) -> float:
        """Units per second so far (0 before the first unit)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None while there is no rate to project from."""
        if self.done >= self.total:
            return 0.0
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def describe(self, unit: str) -> str:
        """E.g. `12,400/100,000 passages (12%), 410 passages/s, 3m38s left`."""
        eta = "time left unknown" if self.eta_s is None else f"{duration(self.eta_s)} left"
        return (f"{self.done:,}/{self.total:,} {unit} ({self.fraction:.0%}), "
                f"{self.rate:,.0f} {unit}/s, {eta}")


class Meter:
    """Counts units of one piece of work and passes the progress to `report`, at most once every
    `every_s` seconds (the first unit and the last are always reported, so a short job says both)."""

    def __init__(self, total: int, report: Callable[[Progress], None], every_s: float = 10.0) -> None:
        self.total = total
        self.done = 0
        self._report = report
        self._every_s = every_s
        self._start = time.perf_counter()
        self._last: float | None = None

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        due = self._last is None or now - self._last >= self._every_s or self.done >= self.total
        if due:
            self._last = now
            self._report(Progress(self.done, self.total, now - self._start))
