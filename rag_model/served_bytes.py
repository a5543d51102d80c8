"""Keep the version being served verified for as long as it is served.

A served version maps only private read-only copies in the local file cache (`rag_model.index`), so
nothing done to the store changes what is served. What is left is the copies themselves: a write by
someone with the server's own rights, or bit rot. Two checks, both off the request path, in one
thread:

- every `stat_seconds`: each served copy's (size, mtime, ctime, inode) against what it had when it was
  verified. Any write, truncation or replacement changes its ctime, so it is seen within seconds.
- every `interval_seconds`: a full re-hash of every served copy at no more than `bytes_per_second`
  (the budget: one pass over N bytes takes N / rate seconds of one core's sha256 at a fraction of its
  time), which also finds a change no stamp shows.

On a mismatch the version is re-opened with every file hashed again (a bad copy is fetched again from
the store and verified); until that succeeds `problem` says what changed and `/readyz` answers 503.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from fsspec.implementations.local import LocalFileSystem

from rag_model.periodic import Periodic
from rag_model.retriever import HotSwapRetriever, SwapResult, events
from storage.cache import PinnedFile
from storage.fs import file_digest
from storage.store import IndexStore

DEFAULT_INTERVAL_SECONDS = 3600.0  # a full re-hash pass of the served copies starts at most this often
DEFAULT_BYTES_PER_SECOND = 64 * 2**20  # and reads no faster than this: ~4% of one EPYC core (sha256 ~1.7 GiB/s)
DEFAULT_STAT_SECONDS = 5.0


class _Stopped(Exception):
    """The checker was stopped in the middle of a pass."""


@dataclass
class PassRecord:
    version: str
    finished_at: float  # time.time()
    seconds: float
    bytes: int
    mismatched: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


class ServedBytesChecker(Periodic):
    thread_name = "ragindex-served-bytes"
    failure_event = "served_bytes_check_failed"

    def __init__(self, store: IndexStore, retriever: HotSwapRetriever, *,
                 interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
                 bytes_per_second: float = DEFAULT_BYTES_PER_SECOND,
                 stat_seconds: float = DEFAULT_STAT_SECONDS) -> None:
        if interval_seconds < 0 or bytes_per_second <= 0 or stat_seconds <= 0:
            raise ValueError("re-verification needs interval >= 0 (0: no re-hash passes), a positive rate "
                             "and a positive stat period")
        super().__init__(retriever, stat_seconds)
        self.store = store
        self.interval_seconds = interval_seconds
        self.bytes_per_second = bytes_per_second
        self.stat_seconds = stat_seconds
        self.problem: str | None = None  # served bytes that no longer match and could not be re-verified
        self.last_pass: PassRecord | None = None
        self._next_pass = time.monotonic() + interval_seconds
        self._lock = threading.Lock()
        retriever.swap_listeners.append(self._on_swap)

    # -- checks ----------------------------------------------------------------------------------------

    def check_stamps(self) -> str | None:
        """Stat every served copy; re-open the version if one changed. Returns the problem left, if any."""
        index = self.retriever.current
        if index is None or self.problem:  # a failed repair is retried by the next pass or a reload, not every stat
            return self.problem
        changed = [f.label for f in index.served_files if f.changed()]
        return self._repair(index.version, changed, "changed on disk") if changed else self.problem

    def rehash_pass(self) -> PassRecord | None:
        """Hash every served copy at no more than `bytes_per_second`; re-open the version on a mismatch."""
        index = self.retriever.current
        if index is None:
            return None
        start, total, mismatched = time.monotonic(), 0, []
        for f in _distinct(index.served_files):
            total += self._digest_matches(f, mismatched, self.bytes_per_second)
        record = PassRecord(index.version, time.time(), time.monotonic() - start, total, mismatched)
        self.last_pass = record
        events.info("re-hashed %d bytes served by %s in %.1fs: %s", total, index.version, record.seconds,
                    "mismatch in " + ", ".join(mismatched) if mismatched else "all match",
                    extra={"event": "served_bytes_checked", "fields": {
                        "version": index.version, "bytes": total, "seconds": record.seconds,
                        "mismatched": len(mismatched)}})
        if mismatched:
            self._repair(index.version, mismatched, "no longer match their sha256")
        return record

    def mismatched_now(self) -> list[str]:
        """The served copies that do not hash to their sha256 now, hashed at full speed (a reload)."""
        index = self.retriever.current
        mismatched: list[str] = []
        for f in _distinct(index.served_files) if index else []:
            self._digest_matches(f, mismatched, float("inf"))
        return mismatched

    def _digest_matches(self, f: PinnedFile, mismatched: list[str], rate: float) -> int:
        """Hash `f` reading at most `rate` bytes/s, adding its label to `mismatched` if it differs; bytes read."""
        read = 0
        began = time.monotonic()

        def throttle(n: int) -> None:
            nonlocal read
            read += n
            if self._stop.is_set():
                raise _Stopped
            ahead = read / rate - (time.monotonic() - began)
            if ahead > 0:
                self._stop.wait(ahead)

        try:
            if file_digest(LocalFileSystem(), f.path, on_block=throttle) != f.sha256:
                mismatched.append(f.label)
        except FileNotFoundError:
            mismatched.append(f.label)
        return read

    def _repair(self, version: str, labels: list[str], how: str) -> str | None:
        with self._lock:
            if self.retriever.version != version:
                return self.problem
            problem = f"served bytes of {version} {how}: {', '.join(labels)}"
            events.error("%s; re-opening it from verified bytes", problem, extra={
                "event": "served_bytes_changed", "fields": {"version": version, "files": labels}})
            result = self.retriever.reopen(self.store, version)
            if result is not None:  # else another version serves now, verified when it swapped in
                self.problem = None if result.ok else f"{problem}; re-opening failed: {result.error}"
            return self.problem

    def _on_swap(self, result: SwapResult) -> None:
        if result.ok:  # whatever serves now was verified just now
            self.problem = None

    def tick(self) -> None:
        self.check_stamps()
        if self.interval_seconds and time.monotonic() >= self._next_pass:
            self.rehash_pass()
            self._next_pass = time.monotonic() + self.interval_seconds

    def status(self) -> dict:
        return {"problem": self.problem, "stat_seconds": self.stat_seconds,
                "interval_seconds": self.interval_seconds, "bytes_per_second": self.bytes_per_second,
                "last_pass": self.last_pass.to_dict() if self.last_pass else None}


def _distinct(files: tuple[PinnedFile, ...]) -> list[PinnedFile]:
    seen: dict[str, PinnedFile] = {}
    for f in files:
        seen.setdefault(f.path, f)
    return list(seen.values())
