"""Rollback holds: what an operator rolled CURRENT away from, kept so that no automatic refresh promotes it again.

    holds/<generation>.json   one per rollback, named by the generation of CURRENT that rollback made

A rollback writes its hold before it moves CURRENT (under the pointer lease), and a record counts
only once CURRENT or its history shows that very move (that generation went from `left` to `to`):
a rollback that fails, or dies, between the two leaves a record nothing reads as a hold, and there
is no moment at which CURRENT was rolled back but the hold is missing. `ragindex resume` releases
holds by compare-and-swap on each record; records are never deleted, because a released hold is
also what lets a refresh promote that content again (`tasks.promote.promote_unfinished`). Plain
JSON, nothing executable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

import fsspec
from pydantic import BaseModel, ValidationError

from storage.errors import Conflict, RagindexError, first_line
from storage.fs import to_url
from storage.manifest import Content, HistoryEntry, Lineage, Manifest, Pointer
from storage.pointer import create_json, delete_json, read_json, swap_json


class HoldStore(Protocol):
    """What hold records need of a store (`storage.store.IndexStore`, which imports this module)."""

    fs: fsspec.AbstractFileSystem

    def path(self, *parts: str) -> str: ...

    def current(self) -> Pointer | None: ...

    def history_entry(self, generation: int) -> HistoryEntry | None: ...

HOLDS_DIR = "holds"


class Hold(BaseModel):
    """One rollback's hold: the version left, what it knew, who rolled back, when and why; and its release."""

    generation: int  # the generation of CURRENT the rollback made: the hold's id
    left: str  # the version rolled away from
    to: str  # the version rolled back to
    # What `left` knew and its content identity; None when its manifest could not be read, which still
    # holds every automatic promote (any active hold does) but matches no content.
    lineage: Lineage | None = None
    content: Content | None = None
    actor: str
    reason: str | None = None
    at: datetime
    released_at: datetime | None = None
    released_by: str | None = None
    release_reason: str | None = None

    @classmethod
    def of(cls, left: str, manifest: Manifest | None, **fields: Any) -> Hold:
        if manifest is None:
            return cls(left=left, **fields)
        return cls(left=left, lineage=manifest.effective_lineage, content=manifest.content, **fields)

    @property
    def active(self) -> bool:
        return self.released_at is None

    def describe(self) -> str:
        """One line: `hold 4: rolled back from <v> (dump 20240101 + 2 days to 20240104) to <w> by <who> at
        <when>: <why>`."""
        knew = f" ({self.lineage.describe()})" if self.lineage else ""
        why = f": {self.reason}" if self.reason else ""
        return (f"hold {self.generation}: rolled back from {self.left}{knew} to {self.to} by {self.actor} "
                f"at {self.at:%Y-%m-%d %H:%M:%S}Z{why}")


def write_pending(store: HoldStore, hold: Hold) -> None:
    """Write the hold of a rollback that is about to move CURRENT to `hold.generation`; the caller holds the
    pointer lease. A record already there is the leftover of a rollback that never moved CURRENT (that
    generation is still ahead of CURRENT), so it is replaced."""
    path = _path(store, hold.generation)
    delete_json(store.fs, path)
    create_json(store.fs, path, hold.model_dump(mode="json"))


def discard_pending(store: HoldStore, hold: Hold) -> None:
    """Remove the hold of a rollback whose move of CURRENT did not happen."""
    pointer = store.current()
    if pointer is None or pointer.generation < hold.generation:
        delete_json(store.fs, _path(store, hold.generation))


def read_holds(store: HoldStore) -> list[Hold]:
    """Every hold whose rollback did move CURRENT, released ones included, oldest first.

    An unreadable record is an error naming it: guessing would either drop a hold or invent one."""
    pointer = store.current()
    if pointer is None:
        return []
    try:
        paths = sorted(p for p in store.fs.ls(store.path(HOLDS_DIR), detail=False) if _is_record(p))
    except FileNotFoundError:
        return []
    holds = []
    for path in paths:
        try:
            data, _ = read_json(store.fs, path)
            hold = Hold.model_validate(data) if data is not None else None
        except (RagindexError, ValidationError) as exc:
            raise RagindexError(f"rollback hold {to_url(store.fs, path)} is unreadable ({first_line(exc)}): "
                                "fix or remove it; until then automatic refreshes cannot tell what is held") from None
        if hold is not None and _confirmed(store, hold, pointer):
            holds.append(hold)
    return holds


def release(store: HoldStore, actor: str, reason: str | None, at: datetime) -> list[Hold]:
    """Mark every active hold released (compare-and-swap per record); the ones this call released."""
    released = []
    for hold in read_holds(store):
        path = _path(store, hold.generation)
        data, token = read_json(store.fs, path)
        if not hold.active or data is None or data.get("released_at"):
            continue  # released already, maybe by a concurrent resume
        new = hold.model_copy(update={"released_at": at, "released_by": actor, "release_reason": reason})

        def still_active(now: dict[str, Any] | None, generation: int = hold.generation) -> None:
            if now is None or now.get("released_at"):
                raise Conflict(f"hold {generation} was released meanwhile")

        try:
            swap_json(store.fs, path, still_active, new.model_dump(mode="json"), token)
        except Conflict:
            continue
        released.append(new)
    return released


def _confirmed(store: HoldStore, hold: Hold, pointer: Pointer) -> bool:
    """Whether the move this hold was written for happened: generation `hold.generation` went `left` -> `to`."""
    if hold.generation > pointer.generation:
        return False
    if hold.generation == pointer.generation:
        return (pointer.version, pointer.previous) == (hold.to, hold.left)
    entry = store.history_entry(hold.generation)
    # No entry: that move's history write failed (the next move repairs it); the hold stands meanwhile.
    return entry is None or (entry.to_version, entry.from_version) == (hold.to, hold.left)


def _path(store: HoldStore, generation: int) -> str:
    return store.path(HOLDS_DIR, f"{generation:08d}.json")


def _is_record(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".json") and name[:-5].isdigit()
