"""Feeding an encoder at the speed of its forward pass: token-budget batches, a prefetch thread,
the thread count of the physical cores, and (on a GPU) the largest batch that fits."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")


def token_budget_batches(lengths: np.ndarray, max_rows: int, max_tokens: int,
                         max_waste: float = 0.125) -> list[np.ndarray]:
    """Row indices in batches of similar token length, longest first (so memory peaks at once).

    A batch closes when its padded size (rows x width of its longest row) would pass `max_tokens`,
    when it holds `max_rows`, or when the next row would be padded by more than `max_waste` of the
    batch's width: the work per forward pass stays even whatever the passages' lengths.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = int(lengths[order[start]])
        rows = max(1, min(max_rows, max_tokens // max(width, 1)))
        end = start + 1
        while end < len(order) and end - start < rows and width - lengths[order[end]] <= max_waste * width:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items`, produced in a background thread at most `depth` ahead of the consumer.

    The producer (tokenizing, padding) overlaps the consumer's forward pass: both release the GIL
    in native code. An exception in the producer is raised in the consumer; a consumer that stops
    early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="encoder-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def physical_cores() -> int:
    """Physical cores this process may run on: hyperthread siblings in the affinity mask count once."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores = set()
            break
    if cores:
        return len(cores)
    import psutil

    return max(1, min(len(allowed), psutil.cpu_count(logical=False) or len(allowed)))


def default_threads(current: int) -> int:
    """Intra-op threads: the physical cores, never more than the environment already set (a Ray
    worker with num_cpus=1 runs with OMP_NUM_THREADS=1, and several of them share the machine)."""
    return max(1, min(current, physical_cores()))


def largest_fitting(try_tokens: Callable[[int], None], start: int, floor: int) -> int:
    """The largest token budget, halving from `start` down to `floor`, whose forward pass fits in GPU
    memory; `try_tokens(n)` runs one pass of n tokens and raises torch.cuda.OutOfMemoryError if not."""
    import torch

    budget = start
    while budget > floor:
        try:
            try_tokens(budget)
            return budget
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            budget //= 2
    return floor
