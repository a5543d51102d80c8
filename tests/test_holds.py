"""Rollback holds in the store, and the rules of an automatic promote (tasks.promote.promote_planned), on local
disk and on S3 (a moto server process). The flows that use them: tests/test_hold_flow.py."""

from __future__ import annotations

import pytest

from storage.errors import Corrupt, RagindexError
from storage.holds import Hold, write_pending
from storage.store import IndexStore
from tasks.promote import NotPromoted, promote_planned, promote_unfinished, rollback_version
from tests.test_store import commit_stub


def test_a_rollback_holds_what_it_left_until_resume(store: IndexStore):
    a, b = commit_stub(store, date="20240101"), commit_stub(store, date="20240201", payload=b"b")
    store.promote(a)
    store.promote(b)
    back = rollback_version(store, actor="alice", reason="bad answers")
    assert back.version == a and back.hold is not None
    [hold] = store.holds()
    assert (hold.generation, hold.left, hold.to, hold.actor, hold.reason) == (3, b, a, "alice", "bad answers")
    assert hold.content == store.manifest(b).content and hold.lineage.base_dump == "20240201"
    assert hold == back.hold and "rolled back from " + b in hold.describe()

    [released] = store.release_holds(actor="bob", reason="fixed upstream")
    assert released.generation == 3 and released.released_by == "bob" and not released.active
    assert store.holds() == [] and store.release_holds() == []
    assert [h.release_reason for h in store.holds(include_released=True)] == ["fixed upstream"]


def test_a_rollback_that_does_not_move_current_holds_nothing(store: IndexStore):
    a, b = commit_stub(store), commit_stub(store, payload=b"b")
    store.promote(a)
    store.promote(b)
    with store.fs.open(store.version_path(a, "data.bin"), "wb") as f:
        f.write(b"altered")  # the move verifies a's files and refuses it
    with pytest.raises(Corrupt):
        store.rollback()
    assert store.current().version == b and store.holds() == []

    # A rollback that died between writing its hold and moving CURRENT leaves a record ahead of CURRENT;
    # a later move that takes that generation elsewhere does not make it a hold.
    c = commit_stub(store, payload=b"c")
    ghost = Hold.of(b, store.manifest(b), generation=3, to=a, actor="ghost", at=store.current().updated_at)
    write_pending(store, ghost)
    assert store.holds() == []
    store.promote(c, expected_generation=2)
    assert store.current().generation == 3 and store.holds() == []


def test_an_unreadable_hold_is_an_error_not_a_guess(store: IndexStore):
    a, b = commit_stub(store), commit_stub(store, payload=b"b")
    store.promote(a)
    store.promote(b)
    store.rollback()
    with store.fs.open(store.path("holds", "00000003.json"), "wb") as f:
        f.write(b"{not json")
    with pytest.raises(RagindexError, match="holds/00000003.json is unreadable"):
        store.holds()


def test_an_automatic_promote_swaps_on_the_planned_generation_and_respects_holds_and_dates(store: IndexStore):
    old, new, newer = (commit_stub(store, date=d, payload=d.encode()) for d in ("20231201", "20240101", "20240201"))
    store.promote(new)
    auto = dict(actor="refresh-index", reason="test")

    with pytest.raises(NotPromoted, match="older than what CURRENT serves .*dump 20240101.*--allow-older") as older:
        promote_planned(store, old, planned_generation=1, **auto)
    assert older.value.status == "older" and store.current().version == new
    with pytest.raises(NotPromoted, match="CURRENT moved from generation 0 to 1 while this run built") as moved:
        promote_planned(store, newer, planned_generation=0, **auto)
    assert moved.value.status == "conflict" and store.current().generation == 1

    store.promote(newer)
    store.rollback()  # holds `newer`
    with pytest.raises(NotPromoted, match="rolled back from") as held:
        promote_planned(store, newer, planned_generation=3, **auto)
    assert held.value.status == "held" and store.current().version == new

    store.release_holds()
    assert promote_planned(store, old, planned_generation=3, allow_older=True, **auto).version == old
    history = store.history()
    # Released: the content rolled away from may be promoted again; a version replaced by a promote may not.
    assert promote_unfinished(store.current(), history, newer, released={3})
    assert not promote_unfinished(store.current(), history, newer)
    assert not promote_unfinished(store.current(), history, new, released={3})
