"""Take a page down in seconds: deny it, publish a tombstone-only version of CURRENT, promote it.

`take_down` resolves a page id or exact title against what CURRENT serves, adds the page to the
store's deny-list (`storage.denylist`), then publishes a takedown version: a delta on CURRENT whose
own rows are empty and whose only change is tombstoning the live rows of every denied page it
serves (`tasks.delta_version.publish_delta`: the delta path, validated like any version). It is
promoted by compare-and-swap on the generation of CURRENT it was built on; when CURRENT moved
meanwhile it is built again on the new CURRENT (twice at most). The history entry's action is
`takedown`, with the actor and the reason.

The deny record is written first: from then on every build leaves the page out and validation rejects
a version serving it, and serving replicas drop its rows at their next poll of CURRENT even before the
takedown version is promoted (`rag_model.index.VersionIndex.without_pages`), so a takedown that fails
half-way has still taken the page down. The takedown version takes no build lock: it must not wait for
a full build that can hold it for hours, and it writes only its own staging area.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from rag_model.lineage import lineage_manifests, served_rows
from storage import denylist
from storage.denylist import Takedown
from storage.errors import Conflict, NotFound, Rejected
from storage.manifest import Manifest
from storage.store import IndexStore, Move, default_actor
from tasks.assemble_version import staged_build
from tasks.delta_version import DeltaSteps, parent_rows, publish_delta
from tasks.empty_rows import write_empty_rows
from tasks.validate import ValidationFloors

KIND = "takedown"
ATTEMPTS = 3  # builds on successive CURRENTs before a takedown gives up on a pointer that keeps moving


@dataclass
class TakedownResult:
    takedown: Takedown  # the deny record
    version: str | None  # the takedown version made CURRENT; None when CURRENT already did not serve the page
    move: Move | None
    seconds: float

    def describe(self) -> str:
        if self.move is None:
            return f"{self.takedown.describe()}; CURRENT already does not serve it"
        return (f"{self.takedown.describe()}; CURRENT -> {self.move.version} (generation {self.move.generation}, "
                f"previous {self.move.previous})")

    def to_json(self) -> dict:
        return {"takedown": self.takedown.model_dump(mode="json"), "version": self.version,
                "current": self.move.model_dump(mode="json") if self.move else None, "seconds": round(self.seconds, 3)}


def take_down(store: IndexStore, page: str, reason: str, *, actor: str | None = None,
              floors: ValidationFloors | None = None) -> TakedownResult:
    """Deny `page` (a page id, or a title CURRENT serves) and make a tombstone-only version of CURRENT
    without it CURRENT. `NotFound` for a page CURRENT does not serve and that is not taken down already."""
    started = datetime.now(UTC)
    if not reason.strip():
        raise Rejected("a takedown needs a --reason (it is kept in the deny-list and the history)")
    actor = actor or default_actor()
    for _ in range(ATTEMPTS):
        pointer = store.current()
        if pointer is None:
            raise NotFound(f"nothing to take down from: {store.url} has no CURRENT version")
        current = store.manifest(pointer.version)
        wiki = current.source.wiki
        found = resolve_page(store, current, page)
        if found is None:
            already = _taken_down(store, wiki, page)
            if already is None:
                raise NotFound(f"no page {page!r} in CURRENT {current.version}: give a page id or an exact title "
                               "it serves")
            return TakedownResult(already, None, None, _since(started))
        page_id, title = found
        record = denylist.deny(store, wiki, page_id, title=title, actor=actor, reason=reason, at=datetime.now(UTC))
        manifest = build_takedown_version(store, current, floors=floors)
        if manifest.status != "ready":
            why = manifest.validation.reason if manifest.validation else "validation failed"
            raise Rejected(f"takedown version {manifest.version} was rejected ({why}); page {page_id} is on the "
                           "deny-list: serving replicas drop it at their next poll, and no build serves it")
        try:
            move = store.promote(manifest.version, expected_generation=pointer.generation, actor=actor,
                                 reason=f"takedown of page {page_id}: {reason}", action="takedown")
        except Conflict:
            continue  # CURRENT moved while building: take the page out of the new CURRENT
        return TakedownResult(record, manifest.version, move, _since(started))
    raise Conflict(f"CURRENT of {store.url} kept moving during {ATTEMPTS} takedown builds; page {page!r} is on the "
                   "deny-list (serving replicas drop it at their next poll): run the takedown again")


def lift(store: IndexStore, page_id: int, *, actor: str | None = None, reason: str | None = None) -> Takedown:
    """Lift the takedown of `page_id` in CURRENT's wiki: the next build that holds the page serves it again."""
    pointer = store.current()
    if pointer is None:
        raise NotFound(f"{store.url} has no CURRENT version")
    wiki = store.manifest(pointer.version).source.wiki
    return denylist.lift(store, wiki, page_id, actor=actor or default_actor(), reason=reason, at=datetime.now(UTC))


def build_takedown_version(store: IndexStore, parent: Manifest, *,
                           floors: ValidationFloors | None = None) -> Manifest:
    """A delta of `parent` with no rows of its own that tombstones the live rows of every denied page it
    serves; validated and committed (never promoted)."""
    if parent.status != "ready":
        raise Rejected(f"CURRENT {parent.version} is {parent.status}: a takedown needs a ready version")
    denied = denylist.denied_page_ids(store, parent.source.wiki)
    ancestors = lineage_manifests(store, parent)
    steps = DeltaSteps()
    tombstones, held = steps.run("parent_pages", parent_rows, store, parent, set(denied))
    version_id = store.begin_version(parent.source.wiki, parent.source.dump_date)
    with staged_build(store, version_id, owner=f"ragindex takedown {version_id}", exclusive=False):
        write_empty_rows(store, version_id, parent, parent.source.model_copy(update={"files": []}))
        taken = sorted(held.pages)
        changes = {"taken_down": [[p, held.pages[p].title] for p in taken], "drop_page_ids": len(taken)}
        # Removing pages is the point: the passage-count floor would refuse a large one.
        return publish_delta(store, version_id, parent, ancestors, np.union1d(tombstones, held.rows_of(taken)),
                             new_rows=0, lineage=parent.effective_lineage, changes=changes, steps=steps,
                             floors=floors, kind=KIND, allow_count_change=True)


def resolve_page(store: IndexStore, manifest: Manifest, page: str) -> tuple[int, str] | None:
    """(page id, title) of the page `manifest` serves whose id, or else whose exact title, is `page`."""
    wanted = page.strip()
    if wanted.isdigit():
        found = _find(store, manifest, "page_id", int(wanted))
        if found is not None:
            return found
    return _find(store, manifest, "title", wanted.replace("_", " "))


def _find(store: IndexStore, manifest: Manifest, column: str, value: object) -> tuple[int, str] | None:
    for table in served_rows(store, manifest, ["page_id", "title"]):
        values = table.column(column).to_numpy(zero_copy_only=False)
        hits = np.flatnonzero(values == value)
        if len(hits):
            i = int(hits[0])
            return int(table.column("page_id")[i].as_py()), table.column("title")[i].as_py()
    return None


def _taken_down(store: IndexStore, wiki: str, page: str) -> Takedown | None:
    wanted = page.strip().replace("_", " ")
    return next((t for t in denylist.takedowns(store, wiki)
                 if str(t.page_id) == wanted or (t.title or "") == wanted), None)


def _since(started: datetime) -> float:
    return (datetime.now(UTC) - started).total_seconds()
