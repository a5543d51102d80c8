"""Move CURRENT: promote a validated version, or roll back to an earlier one (compare-and-swap).

Two kinds of promote. An operator's (`ragindex promote`) is an explicit act: it checks only that the
version is ready and intact, with the whole lineage it serves (`IndexStore.promote`). A refresh
run's (`promote_planned`) is automatic, and also refuses to move CURRENT when it is no longer the one
the run planned from, while a rollback hold is active (`storage.holds`), to a version that knows less
recent Wikipedia than CURRENT does, or to one built before a takedown that serves the page taken down
(`storage.denylist`).
"""

from __future__ import annotations

from collections.abc import Collection

from rag_model.lineage import served_page_ids
from storage import denylist
from storage.errors import Conflict, CorruptManifest, NotFound, RagindexError
from storage.holds import Hold
from storage.manifest import Content, HistoryEntry, Manifest, Pointer
from storage.store import IndexStore, Move


def promote_version(store: IndexStore, version_id: str, *, actor: str | None = None, reason: str | None = None,
                    expected_generation: int | None = None) -> Move:
    """Point CURRENT at a `ready` version. `Rejected` for a rejected one, `NotFound` for a missing one,
    `Conflict` when CURRENT moved past `expected_generation` (or while swapping)."""
    return store.promote(version_id, expected_generation=expected_generation, actor=actor, reason=reason)


def rollback_version(store: IndexStore, version_id: str | None = None, *, actor: str | None = None,
                     reason: str | None = None) -> Move:
    """Point CURRENT back at `version_id` (default: the newest ready version older than CURRENT), and hold the
    version left (`Move.hold`) from automatic promotes until `ragindex resume`. Refuses rejected, corrupt or
    missing versions."""
    return store.rollback(version_id, actor=actor, reason=reason)


class NotPromoted(RagindexError):
    """An automatic promote that must not happen; `status` says why: `conflict` (CURRENT moved since the run
    planned), `held` (a rollback hold is active), `older` (older knowledge than CURRENT's) or `denied` (it
    serves a page taken down after it was built)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def promote_planned(store: IndexStore, version_id: str, *, planned_generation: int, allow_older: bool = False,
                    actor: str, reason: str) -> Move:
    """A refresh run's promote: a compare-and-swap on `planned_generation`, the generation of CURRENT the run
    planned from. `NotPromoted` (CURRENT untouched, the version kept as it is) when CURRENT moved since, while
    any rollback hold is active (the choice for content new since the hold too: the operator rolled back
    and decides when automatic promotes start again), or, unless `allow_older`, when the version's knowledge
    (its dump, or its newest applied day) is older than CURRENT's."""
    pointer = store.current()
    _check_generation(pointer, planned_generation, version_id)
    candidate = store.manifest(version_id)
    active = store.holds()
    if active:
        raise NotPromoted("held", held_reason(f"version {version_id}", candidate.content, active))
    if pointer is not None and not allow_older:
        _check_not_older(store, candidate, pointer)
    _check_not_denied(store, candidate)
    try:
        return store.promote(version_id, expected_generation=planned_generation, actor=actor, reason=reason)
    except Conflict:
        _check_generation(store.current(), planned_generation, version_id)
        raise  # not the generation: the pointer lease, or a swap lost some other way


def held_reason(subject: str, content: Content, active: list[Hold]) -> str:
    """Why `subject` (of `content`) is not promoted while the `active` holds are, in one line."""
    same = [h for h in active if h.content == content]
    hold = (same or active)[-1]
    what = ("is the content rolled back from" if same
            else "is new content, ready but not promoted while a rollback holds")
    others = f" (and {len(active) - 1} more hold{'s' if len(active) > 2 else ''})" if len(active) > 1 else ""
    return f"{subject} {what}: {hold.describe()}{others}; `ragindex resume` (or resume=true) releases it"


def _check_generation(pointer: Pointer | None, planned: int, version_id: str) -> None:
    now = pointer.generation if pointer else 0
    if now != planned:
        raise NotPromoted("conflict", f"CURRENT moved from generation {planned} to {now} while this run built "
                                      f"{version_id}: not promoted (it is kept; CURRENT is "
                                      f"{pointer.version if pointer else None})")


def _check_not_older(store: IndexStore, candidate: Manifest, pointer: Pointer) -> None:
    try:
        serving = store.manifest(pointer.version)
    except (NotFound, CorruptManifest):
        return  # nothing readable is served: anything ready is better than that
    if serving.source.wiki != candidate.source.wiki:
        return  # another wiki's dates say nothing about this one's
    mine, theirs = candidate.effective_lineage, serving.effective_lineage
    if mine.watermark < theirs.watermark:
        raise NotPromoted("older", f"version {candidate.version} ({mine.describe()}) is older than what CURRENT "
                                   f"serves ({pointer.version}: {theirs.describe()}): not promoted; pass "
                                   "--allow-older (allow_older=true) to promote it anyway")


def _check_not_denied(store: IndexStore, candidate: Manifest) -> None:
    """A version validated before a page was taken down may serve it (built, then kept unpromoted by a
    conflict or a hold): no automatic promote makes it CURRENT. Versions validated since were checked."""
    recent = {t.page_id: t for t in denylist.takedowns(store, candidate.source.wiki) if t.at >= candidate.created_at}
    if not recent:
        return
    served = sorted(set(served_page_ids(store, candidate).tolist()) & recent.keys())
    if served:
        raise NotPromoted("denied", f"version {candidate.version} was built before {recent[served[0]].describe()}, "
                                    "and serves it: not promoted (the next build leaves the page out)")


def owed_promote(store: IndexStore, version_id: str) -> bool:
    """`promote_unfinished` with what the store says now: CURRENT, its history and the released holds."""
    released = {h.generation for h in store.holds(include_released=True) if not h.active}
    return promote_unfinished(store.current(), store.history(), version_id, released)


def promote_unfinished(current: Pointer | None, history: list[HistoryEntry], version_id: str,
                       released: Collection[int] = ()) -> bool:
    """Whether a ready version, that a run finds already holding what it was asked to build, is owed its promote.

    The rule: a version CURRENT names is up to date. Otherwise, when CURRENT is absent, or the history
    never shows the version becoming CURRENT, a run committed it and stopped before promoting (killed
    between commit and promote, or run with promote=false): promoting it now is what an uninterrupted
    run asked to promote does. A version that was CURRENT once and is not now was moved away from on
    purpose (a rollback, or a later promote): it is never re-promoted behind the operator's back, unless
    the move away from it was a rollback whose hold the operator released since (`released`: the
    generations of released holds), which says that content may be promoted again.
    """
    if current is None:
        return True
    if current.version == version_id:
        return False
    if all(entry.to_version != version_id for entry in history):
        return True
    left = [entry for entry in history if entry.from_version == version_id]
    return bool(left) and left[-1].action == "rollback" and left[-1].generation in released
