"""Move CURRENT: promote a validated version, or roll back to an earlier one (compare-and-swap)."""

from __future__ import annotations

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
