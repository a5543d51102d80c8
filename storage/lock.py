"""Leases: a lock object in the store that its holder keeps alive with a heartbeat.

A lease names its holder by a random token, not by host and pid (a restarted container has a new
host name, and a pid means nothing on another machine). The holder's heartbeat thread pushes
`expires_at` forward; a lease whose `expires_at` has passed belongs to a holder that died and may be
broken. Breaking is itself a compare-and-swap on the exact bytes that were read, so of two processes
breaking the same stale lease only one gets it. Release deletes the lease only while it is still
ours. A lock file that is not a lease record (malformed) is reported in one line and broken the same way.

One shortcut before expiry: a lease taken during this very boot of this machine (same boot id) by a
process that no longer exists is broken at once, so a build re-run right after a crash need not wait
out the ttl. It is only ever an earlier answer: a lease from another machine, another boot or a
restarted container (new boot id or host name) is judged by its expiry alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import fsspec

from storage.errors import Conflict
from storage.liveness import died_on_this_boot, this_process
from storage.pointer import create_json, delete_exact, encode, read_raw, replace_exact

log = logging.getLogger(__name__)
_PRE_LEASE_STALE = timedelta(hours=12)


class Lease:
    """Hold the lock object at `path` for `owner`; use as a context manager, or `acquire` / `release`."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        owner: str,
        ttl: timedelta = timedelta(minutes=2),
        wait: float = 0.0,
        where: str | None = None,
        holder: str = "another build",
    ) -> None:
        self.fs, self.path, self.owner, self.ttl, self.wait = fs, path, owner, ttl, wait
        self.where, self.holder = where or path, holder
        self.token = uuid.uuid4().hex
        self.lost = False  # set when someone broke our lease while we held it (we stalled past ttl)
        self._written: bytes | None = None
        self._token: Any = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._mutex = threading.Lock()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- taking and giving back ----------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease (breaking an expired or malformed one), or raise `Conflict` naming the holder.
        With `wait` > 0, a held lease is retried for that many seconds first."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self._try_acquire()
                break
            except Conflict:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.owner}", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        with self._mutex:
            if self._written is None:
                return
            if not delete_exact(self.fs, self.path, self._written):
                log.warning("lock %s was taken over by someone else while %s held it; left it to them",
                            self.where, self.owner)
            self._written = None

    # -- internals -----------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "owner": self.owner, "token": self.token, "since": now.isoformat(),
            "expires_at": (now + self.ttl).isoformat(), **this_process(),
        }

    def _try_acquire(self) -> None:
        record = self._record()
        try:
            create_json(self.fs, self.path, record)
        except Conflict:
            self._take_over(record)
        self._remember(record)

    def _take_over(self, record: dict[str, Any]) -> None:
        seen, token = read_raw(self.fs, self.path)
        if seen is None:  # released between our create and our read: try once more
            create_json(self.fs, self.path, record)
            return
        held = _parse_lease(seen)
        if held is None:
            log.warning("lock %s is malformed (not a lease record); breaking it", self.where)
        elif died_on_this_boot(held):
            log.warning("lock %s is held by %s, whose process is gone; breaking it", self.where, held["owner"])
        elif datetime.now(UTC) < held["expires_at"]:
            raise Conflict(f"{self.holder} holds the lock on {self.where}: {held['owner']} since {held['since']}")
        replace_exact(self.fs, self.path, seen, token, record)  # Conflict if another breaker won

    def _remember(self, record: dict[str, Any]) -> None:
        data, token = read_raw(self.fs, self.path)
        if data != encode(record):
            raise Conflict(f"lost the lock on {self.where} right after taking it")
        self._written, self._token = data, token

    def _heartbeat(self) -> None:
        interval = max(self.ttl.total_seconds() / 3, 0.05)
        while not self._stop.wait(interval):
            with self._mutex:
                if self._written is None:
                    return
                record = {**json.loads(self._written), "expires_at": (datetime.now(UTC) + self.ttl).isoformat()}
                try:
                    replace_exact(self.fs, self.path, self._written, self._token, record)
                    self._written, self._token = read_raw(self.fs, self.path)
                except Conflict:
                    self.lost = True
                    self._written = None
                    log.error("lock %s held by %s was broken by someone else (heartbeat too late)",
                              self.where, self.owner)
                    return
                except Exception as exc:  # a network blip: the next beat tries again before expiry
                    log.warning("could not renew lock %s: %s", self.where, exc)


def live_holder(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The owner of the lease at `path` while its holder is alive (its heartbeat keeps `expires_at` ahead
    and its process, if it ran on this boot of this machine, exists), else None: what a lease protects
    stays protected for exactly as long as nobody may break it."""
    data, _ = read_raw(fs, path)
    held = _parse_lease(data) if data is not None else None
    if held is None or died_on_this_boot(held) or datetime.now(UTC) >= held["expires_at"]:
        return None
    return held["owner"]


def _parse_lease(data: bytes) -> dict[str, Any] | None:
    """The lease record in `data`, or None when it is not one (malformed JSON, fields missing)."""
    try:
        obj = json.loads(data)
        owner = str(obj["owner"])
        if "expires_at" in obj:
            expires = datetime.fromisoformat(obj["expires_at"])
        else:  # a lock taken before leases existed: it went stale after 12 hours
            expires = datetime.fromisoformat(obj["since"]) + _PRE_LEASE_STALE
    except (ValueError, KeyError, TypeError):
        return None
    if expires.tzinfo is None:
        return None
    return {"owner": owner, "since": obj.get("since"), "expires_at": expires, "pid": obj.get("pid"),
            "host": obj.get("host"), "boot_id": obj.get("boot_id")}
