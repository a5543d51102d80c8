"""The deny-list: pages taken down (`ragindex takedown`), which no new version may serve until lifted.

    denylist/<wiki>/<page_id>/<seq>.json        one takedown: the page, its title, who, when, why
    denylist/<wiki>/<page_id>/<seq>.lift.json   its lift (`ragindex takedown --lift`): who, when, why

Every record is created once (If-None-Match) and never rewritten or deleted, so the deny-list is also
its own audit trail: a page taken down, lifted and taken down again has records 1, 1.lift and 2. A
page is denied while its newest takedown has no lift. Which pages are denied is read from the names
alone (one listing, no reads), cheap enough for a serving replica to do at every poll of CURRENT.

Who reads it: every build (passages assembly, a delta's planning, validation, which rejects a
version serving a denied page) and serving (`rag_model.index`, which drops denied pages' rows at
query time, so a rollback to a version from before a takedown does not bring a page back).
Plain JSON, nothing executable.
"""

from __future__ import annotations

import contextlib
import re
from datetime import datetime
from typing import Protocol

import fsspec
from pydantic import BaseModel, ValidationError

from storage import names
from storage.errors import Conflict, NotFound, RagindexError, first_line
from storage.fs import to_url
from storage.pointer import create_json, read_json

DENYLIST_DIR = "denylist"
_RECORD = re.compile(r"^(\d{1,12})/(\d{4,})(\.lift)?\.json$")


class DenyStore(Protocol):
    """What deny records need of a store (`storage.store.IndexStore`)."""

    fs: fsspec.AbstractFileSystem

    def path(self, *parts: str) -> str: ...


class Takedown(BaseModel):
    """One takedown of a page: the page, who took it down, when and why; and its lift, once lifted."""

    wiki: str
    page_id: int
    seq: int  # 1 for a page's first takedown, 2 after one lift and a new takedown, ...
    title: str | None = None
    actor: str
    reason: str
    at: datetime
    lifted_at: datetime | None = None
    lifted_by: str | None = None
    lift_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.lifted_at is None

    def describe(self) -> str:
        """One line: `page 12 (Some title) taken down by <who> at <when>: <why>`."""
        title = f" ({self.title})" if self.title else ""
        return (f"page {self.page_id}{title} taken down by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}Z: "
                f"{self.reason}")


class _Lift(BaseModel):
    actor: str
    reason: str | None = None
    at: datetime


def denied_page_ids(store: DenyStore, wiki: str) -> frozenset[int]:
    """The page ids of `wiki` no new version may serve: those whose newest takedown is not lifted.

    One listing of the store, no record read: what every build and serving replica calls."""
    return frozenset(page for page, (_, lifted) in _newest(store, wiki).items() if not lifted)


def takedowns(store: DenyStore, wiki: str, include_lifted: bool = False) -> list[Takedown]:
    """The takedowns of `wiki` (with `include_lifted`, every one ever made), oldest first."""
    found = []
    for page, seqs in sorted(_listing(store, wiki).items()):
        for seq, lifted in sorted(seqs.items()):
            newest = seq == max(seqs)
            if not (include_lifted or (newest and not lifted)):
                continue
            record = _read(store, _path(store, wiki, page, seq), Takedown)
            if record.page_id != page or record.seq != seq or record.wiki != wiki:
                raise RagindexError(f"takedown record {to_url(store.fs, _path(store, wiki, page, seq))} names "
                                    f"page {record.page_id} #{record.seq} of {record.wiki}: fix or remove it")
            if lifted:
                lift = _read(store, _path(store, wiki, page, seq, lift=True), _Lift)
                record = record.model_copy(update={"lifted_at": lift.at, "lifted_by": lift.actor,
                                                   "lift_reason": lift.reason})
            found.append(record)
    return sorted(found, key=lambda t: (t.at, t.page_id))


def active_takedown(store: DenyStore, wiki: str, page_id: int) -> Takedown | None:
    """The takedown that denies `page_id` now, if any."""
    return next((t for t in takedowns(store, wiki) if t.page_id == page_id), None)


def deny(store: DenyStore, wiki: str, page_id: int, *, title: str | None, actor: str, reason: str,
         at: datetime) -> Takedown:
    """Add `page_id` to the deny-list (a new record); the page's active takedown when it is denied already."""
    names.check_wiki(wiki)
    for _ in range(3):
        held = _listing(store, wiki).get(page_id, {})
        newest = max(held, default=0)
        if newest and not held[newest]:
            found = active_takedown(store, wiki, page_id)
            if found is not None:
                return found
        record = Takedown(wiki=wiki, page_id=page_id, seq=newest + 1, title=title, actor=actor, reason=reason, at=at)
        try:
            create_json(store.fs, _path(store, wiki, page_id, record.seq), record.model_dump(mode="json"))
        except Conflict:
            continue  # a concurrent takedown of the same page wrote this seq: read again
        return record
    raise Conflict(f"page {page_id} of {wiki}: its deny-list records kept changing while taking it down")


def lift(store: DenyStore, wiki: str, page_id: int, *, actor: str, reason: str | None, at: datetime) -> Takedown:
    """Lift the active takedown of `page_id` (a lift record beside it); `NotFound` when none is active."""
    record = active_takedown(store, wiki, page_id)
    if record is None:
        raise NotFound(f"page {page_id} of {wiki} is not taken down (see `ragindex takedown --list`)")
    lifted = _Lift(actor=actor, reason=reason, at=at)
    with contextlib.suppress(Conflict):  # lifted concurrently: lifted all the same
        create_json(store.fs, _path(store, wiki, page_id, record.seq, lift=True), lifted.model_dump(mode="json"))
    return record.model_copy(update={"lifted_at": at, "lifted_by": actor, "lift_reason": reason})


def _listing(store: DenyStore, wiki: str) -> dict[int, dict[int, bool]]:
    """page id -> {seq -> lifted} from the record names under `denylist/<wiki>/`."""
    base = store.path(DENYLIST_DIR, names.check_wiki(wiki))
    try:
        paths = store.fs.find(base)
    except FileNotFoundError:
        return {}
    pages: dict[int, dict[int, bool]] = {}
    for path in paths:
        match = _RECORD.match(path.rstrip("/")[len(base.rstrip("/")) + 1:])
        if match is None:
            continue  # a temporary file of an atomic write, or something not ours
        seqs = pages.setdefault(int(match.group(1)), {})
        seq = int(match.group(2))
        seqs[seq] = seqs.get(seq, False) or bool(match.group(3))
    return pages


def _newest(store: DenyStore, wiki: str) -> dict[int, tuple[int, bool]]:
    return {page: (max(seqs), seqs[max(seqs)]) for page, seqs in _listing(store, wiki).items()}


def _read(store: DenyStore, path: str, model: type[BaseModel]):
    try:
        data, _ = read_json(store.fs, path)
        if data is None:
            raise NotFound(f"{to_url(store.fs, path)} is gone")
        return model.model_validate(data)
    except (RagindexError, ValidationError) as exc:
        raise RagindexError(f"deny-list record {to_url(store.fs, path)} is unreadable ({first_line(exc)}): "
                            "fix or remove it") from None


def _path(store: DenyStore, wiki: str, page_id: int, seq: int, lift: bool = False) -> str:
    return store.path(DENYLIST_DIR, wiki, str(page_id), f"{seq:04d}{'.lift' if lift else ''}.json")
