"""Follow the store's CURRENT pointer and swap the retriever whenever it names another version.

Promotes and rollbacks are the same thing here: CURRENT names a version that is not serving. At
each poll the store's deny-list is read too, and the pages taken down are dropped from what is
served (`HotSwapRetriever.deny_pages`), so a takedown reaches every replica within one poll.
A version that fails to load is not retried on every poll (that would reload a broken multi-GB
index every few seconds); it is retried when CURRENT moves again or on an explicit `check(retry=True)`.
"""

from __future__ import annotations

import threading
import time

from rag_model.periodic import Periodic
from rag_model.retriever import HotSwapRetriever, SwapResult, events
from storage.denylist import denied_page_ids
from storage.manifest import Pointer
from storage.store import IndexStore


class CurrentWatcher(Periodic):
    thread_name = "ragindex-current-watcher"
    failure_event = "watcher_failed"

    def __init__(self, store: IndexStore, retriever: HotSwapRetriever, poll_seconds: float = 10.0) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
        super().__init__(retriever, poll_seconds)
        self.store = store
        self.last_error: str | None = None  # reading CURRENT failed (store unreachable): keep serving
        self.generation: int | None = None
        self.current_version: str | None = None  # what CURRENT named at the last successful read
        self.behind_since: float | None = None  # monotonic time since CURRENT names a version not serving
        self._failed: tuple[int, str] | None = None
        self._check_lock = threading.Lock()

    def check(self, retry: bool = False, reverify: bool = False) -> SwapResult | None:
        """Read CURRENT once and swap if it names another version. Returns the swap's result, if any.

        `retry` also retries a version that failed to load at this generation; `reverify` (a reload)
        re-opens even the version serving, every file hashed again."""
        with self._check_lock:
            try:
                pointer = self.store.current()
            except Exception as exc:  # a flaky store must not stop serving what is loaded
                self.last_error = f"cannot read CURRENT from {self.store.url}: {exc}"
                events.warning(self.last_error, extra={"event": "current_unreadable", "fields": {
                    "store": self.store.url, "error": str(exc), "serving": self.retriever.version}})
                return None
            self.last_error = None
            if pointer is None:
                return None
            self.generation = pointer.generation
            self.current_version = pointer.version
            result = self._follow(pointer, retry, reverify)
            self._apply_denylist()  # also when the swap failed: the version still serving drops them
            return result

    def _follow(self, pointer: Pointer, retry: bool, reverify: bool) -> SwapResult | None:
        if pointer.version == self.retriever.version:
            self._failed = None
            self.behind_since = None
            if not reverify:
                return None
            return self.retriever.reopen(self.store, pointer.version)
        if self.behind_since is None:
            self.behind_since = time.monotonic()
        if not retry and self._failed == (pointer.generation, pointer.version):
            return None
        result = self.retriever.swap_to(self.store, pointer.version, rehash=reverify)
        self._failed = None if result.ok else (pointer.generation, pointer.version)
        if result.ok:
            self.behind_since = None
        return result

    @property
    def poll_seconds(self) -> float:
        return self.period_seconds

    def _apply_denylist(self) -> None:
        """Drop the pages taken down since the version was opened (a swap opens a version with the deny-list
        of its time): this is what takes a page out of every replica within one poll, whatever it serves."""
        current = self.retriever.current
        if current is None:
            return
        try:
            denied = denied_page_ids(self.store, current.manifest.source.wiki)
        except Exception as exc:  # keep serving with the deny-list read last; say why
            self.last_error = f"cannot read the deny-list of {self.store.url}: {exc}"
            events.warning(self.last_error, extra={"event": "denylist_unreadable", "fields": {
                "store": self.store.url, "error": str(exc), "serving": current.version}})
            return
        self.retriever.deny_pages(denied)

    def behind_for(self) -> float:
        """Seconds this process has not been serving the version CURRENT names (0 when it is)."""
        since = self.behind_since
        return 0.0 if since is None else time.monotonic() - since

    def tick(self) -> None:
        self.check()
