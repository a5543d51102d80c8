"""A serving background job: one daemon thread calling `tick` every period until stopped.

The CURRENT watcher and the served-bytes checker both run this way; a tick that raises is logged on
`ragindex.serving` and the next one runs as usual (a flaky store or disk must not stop serving).
"""

from __future__ import annotations

import threading

from rag_model.retriever import HotSwapRetriever, events


class Periodic:
    thread_name = "ragindex-periodic"
    failure_event = "periodic_failed"

    def __init__(self, retriever: HotSwapRetriever, period_seconds: float) -> None:
        self.retriever = retriever
        self.period_seconds = period_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> Periodic:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                if self._stop.is_set():  # a tick cut short by stop
                    return
                events.exception("%s failed; will retry", self.thread_name, extra={
                    "event": self.failure_event, "fields": {"serving": self.retriever.version}})
            self._wake.wait(self.period_seconds)
            self._wake.clear()
