"""One stopwatch for every step that reports how long it took."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TypeVar

T = TypeVar("T")


def duration(seconds: float) -> str:
    """`42s`, `3m38s`, `2h05m`: short enough for a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[key]` (rounded to ms), also when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - start, 3)


class Steps:
    """The steps of one run: each named while it runs and timed as `<name>_s` in `timings`.

    After a failure `current` is the step that failed: what a run report and a one-line error name."""

    def __init__(self, timings: dict[str, float] | None = None) -> None:
        self.timings: dict[str, float] = {} if timings is None else timings
        self.current: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        with timed(self.timings, f"{name}_s"):
            yield

    @contextmanager
    def holding(self, name: str, resource: AbstractContextManager[T]) -> Iterator[T]:
        """Enter `resource` (a lock) as step `name`, so that waiting for it or being refused it is named and
        timed; it is held until the block ends, whatever step the block is in by then."""
        with ExitStack() as stack:
            with self(name):
                value = stack.enter_context(resource)
            yield value
