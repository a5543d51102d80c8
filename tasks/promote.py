"""Move CURRENT: promote a validated version, or roll back to an earlier one (compare-and-swap)."""

from __future__ import annotations

from storage.manifest import HistoryEntry, Pointer
from storage.store import IndexStore, Move


def promote_version(store: IndexStore, version_id: str, *, actor: str | None = None, reason: str | None = None,
                    expected_generation: int | None = None) -> Move:
    """Point CURRENT at a `ready` version. `Rejected` for a rejected one, `NotFound` for a missing one,
    `Conflict` when CURRENT moved past `expected_generation` (or while swapping)."""
    return store.promote(version_id, expected_generation=expected_generation, actor=actor, reason=reason)


def rollback_version(store: IndexStore, version_id: str | None = None, *, actor: str | None = None,
                     reason: str | None = None) -> Move:
    """Point CURRENT back at `version_id` (default: the newest ready version older than CURRENT).
    Refuses rejected, corrupt or missing versions."""
    return store.rollback(version_id, actor=actor, reason=reason)


def promote_unfinished(current: Pointer | None, history: list[HistoryEntry], version_id: str) -> bool:
    """Whether a ready version, that a run finds already holding what it was asked to build, is owed its promote.

    The rule: a version CURRENT names is up to date. Otherwise, when CURRENT is absent, or the history
    never shows the version becoming CURRENT, a run committed it and stopped before promoting (killed
    between commit and promote, or run with promote=false): promoting it now is what an uninterrupted
    run asked to promote does. A version that was CURRENT once and is not now was moved away from on
    purpose (a rollback, or a later promote): it is never re-promoted behind the operator's back.
    """
    if current is None:
        return True
    if current.version == version_id:
        return False
    return all(entry.to_version != version_id for entry in history)
