"""A takedown through the real refresh-index flow (temporary Prefect server, loopback mirror, tiny DPR):
the nightly delta and the next full build leave the page out; after `ragindex takedown --lift` the next
build holding the page serves it again."""

from __future__ import annotations

from flows.refresh import refresh_index
from rag_model.lineage import served_page_ids
from storage import denylist
from storage.store import IndexStore
from tasks.takedown import lift, take_down
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import make_incr_day
from tests.fixtures.mirror import Page, sample_pages


def _served(store: IndexStore, version: str) -> set[int]:
    return set(served_page_ids(store, store.manifest(version)).tolist())


def test_nightly_and_full_builds_honour_a_takedown_until_lifted(prefect_api, mirror, tiny_dpr, tmp_path):
    store_url = str(tmp_path / "store")
    store = IndexStore(store_url)
    common = dict(wiki="enwiki", mirror=mirror.url, store_url=store_url, encoder=str(tiny_dpr.ctx_dir),
                  encoder_kind="dpr", index_spec="flat", shard_rows=40, allow_count_change=True)
    pages = sample_pages(8)
    gone, edited = pages[0], pages[1]
    mirror.add_run("enwiki", "20240101", pages)
    full = refresh_index(**common)
    assert full["status"] == "promoted" and gone.page_id in _served(store, full["version"])

    taken = take_down(store, gone.title, "court order")
    assert gone.page_id not in _served(store, taken.version)

    # The nightly delta: an edit of the page taken down and of another page; only the other is applied.
    rev = max(p.revision for p in pages) + 10
    day = [HistPage(gone.page_id, gone.title, [(rev, gone.text + " Edited after its takedown.")]),
           HistPage(edited.page_id, edited.title, [(rev + 1, edited.text + " Edited the same night.")])]
    make_incr_day(mirror.root, "enwiki", "20240102", history_xml("enwiki", day), maxrevid=rev + 1)
    night = refresh_index(**common)
    assert night["status"] == "promoted" and night["mode"] == "delta", night["reason"]
    delta = store.manifest(night["version"])
    assert delta.parent == taken.version and delta.changes["denied"] == 1
    assert [p for p, _ in delta.changes["changed"]] == [edited.page_id]
    assert gone.page_id not in _served(store, delta.version)

    # The next full dump still has the page: the full build leaves it out, and says so.
    mirror.add_run("enwiki", "20240201", [Page(p.page_id, p.title, p.text, rev_id=rev + 20) for p in pages])
    rebuilt = refresh_index(**common)
    assert rebuilt["status"] == "promoted" and rebuilt["mode"] == "full", rebuilt["reason"]
    m = store.manifest(rebuilt["version"])
    assert not m.is_delta and m.skipped.get("denied") == 1
    assert _served(store, m.version) == {p.page_id for p in pages} - {gone.page_id}

    # Lifted: the next build that holds the page (an edit of it) serves it again.
    lift(store, gone.page_id, reason="appeal won")
    assert denylist.denied_page_ids(store, "enwiki") == frozenset()
    day = [HistPage(gone.page_id, gone.title, [(rev + 30, gone.text + " Back after the appeal.")])]
    make_incr_day(mirror.root, "enwiki", "20240202", history_xml("enwiki", day), maxrevid=rev + 30)
    back = refresh_index(**common)
    assert back["status"] == "promoted" and back["mode"] == "delta", back["reason"]
    assert [p for p, _ in store.manifest(back["version"]).changes["added"]] == [gone.page_id]
    assert gone.page_id in _served(store, back["version"])
