"""Takedown: `ragindex takedown` on a store with a full and a delta version (local disk and moto S3), the
deny-list records, validation's and the builds' refusal to serve a denied page, and serving's query-time
filter (a rollback past a takedown does not bring the page back)."""

from __future__ import annotations

import numpy as np
import pytest

from rag_model.encoders import EncoderSpec
from rag_model.index import VersionIndex
from rag_model.lineage import served_page_ids
from storage import denylist, layout
from storage.errors import RagindexError
from storage.location import Location
from storage.store import IndexStore
from tasks.delta_version import build_delta_version
from tasks.takedown import take_down
from tests.fixtures.history import HistPage
from tests.fixtures.versions import make_version, random_passages
from tests.test_cli_store import run
from tests.test_delta_version import _day, _words


def _apply_day(store: IndexStore, parent: str, tmp_path, tiny_dpr, date: str, pages: list[HistPage]):
    day, path = _day(tmp_path, date, pages)
    return build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                               progress=False)


@pytest.fixture
def lineage(store, tmp_path, tiny_dpr, tiny_ctx_fingerprint):
    """A ready full version of 40 articles (3 passages each, pages 1..40, "Article N") and, CURRENT on top
    of it, a real delta that edits page 3 and adds page 77 ("Brand new")."""
    passages = random_passages(120, pages=40)
    vectors = np.random.default_rng(0).standard_normal((120, tiny_ctx_fingerprint.dim)).astype(np.float32)
    full = make_version(store, passages, vectors, tiny_ctx_fingerprint, spec="IVF4,Flat", wiki="enwiki",
                        promote=True)
    delta = _apply_day(store, full, tmp_path, tiny_dpr, "20240102",
                       [HistPage(3, "Article 3", [(5000, _words("edited"))]),
                        HistPage(77, "Brand new", [(5001, _words("new"))])])
    store.promote(delta.version, actor="tests")
    return store, full, delta.version


def _served_by_search(store: IndexStore, version: str) -> set[int]:
    """Page ids a search over every row of `version` returns, through serving's own index."""
    index = VersionIndex.open(store, version)
    queries = np.random.default_rng(1).standard_normal((8, index.dim)).astype(np.float32)
    return {h.page_id for hits in index.search(queries, 200) for h in hits}


@pytest.mark.parametrize("store_backend", ["local", "s3"], indirect=True)
def test_cli_takedown_publishes_a_tombstone_only_version(lineage, store_url, s3_endpoint, capsys, monkeypatch):
    store, full, delta = lineage
    from flows.settings import load_settings

    if s3_endpoint:
        monkeypatch.setenv("RAGINDEX_S3_ENDPOINT_URL", s3_endpoint)
    load_settings.cache_clear()
    try:
        code, out, err = run(["takedown", "Brand new", "--reason", "court order 17", "--store", store_url], capsys)
        assert code == 0, err
        assert "taken down: page 77 (Brand new)" in out

        pointer = store.current()
        m = store.manifest(pointer.version)
        assert m.kind == "takedown" and m.mode == "takedown" and m.status == "ready"
        assert m.parent == delta and [s.version for s in m.segments] == [full, delta]
        assert m.counts["passages"] == 0 and m.changes["taken_down"] == [[77, "Brand new"]]
        assert m.lineage == store.manifest(delta).lineage  # no day applied: the same knowledge, minus the page
        assert 77 not in served_page_ids(store, m) and 77 not in _served_by_search(store, m.version)
        assert served_page_ids(store, m).tolist() == [p for p in served_page_ids(store, store.manifest(delta))
                                                      if p != 77]
        entry = store.history()[-1]
        assert (entry.action, entry.from_version, entry.to_version) == ("takedown", delta, m.version)
        assert "court order 17" in entry.reason and entry.actor
        record = denylist.active_takedown(store, "enwiki", 77)
        assert record.reason == "court order 17" and record.title == "Brand new"

        # Unknown page: one line, non-zero, nothing changed.
        code, out, err = run(["takedown", "No such page", "--reason", "x", "--store", store_url], capsys)
        assert code != 0 and err.strip().count("\n") == 0 and "no page 'No such page'" in err
        assert store.current() == pointer

        code, out, err = run(["takedown", "--lift", "77", "--reason", "appeal won", "--store", store_url], capsys)
        assert code == 0 and "lifted" in out
        assert denylist.denied_page_ids(store, "enwiki") == frozenset()
        kept = denylist.takedowns(store, "enwiki", include_lifted=True)
        assert [(t.page_id, t.lifted_by is not None, t.lift_reason) for t in kept] == [(77, True, "appeal won")]
    finally:
        load_settings.cache_clear()


def test_a_takedown_by_page_id_of_a_full_version_and_its_edge_cases(store, tiny_ctx_fingerprint):
    passages = random_passages(60, pages=20)
    vectors = np.random.default_rng(0).standard_normal((60, tiny_ctx_fingerprint.dim)).astype(np.float32)
    full = make_version(store, passages, vectors, tiny_ctx_fingerprint, wiki="enwiki", promote=True)
    with pytest.raises(RagindexError, match="needs a --reason"):
        take_down(store, "4", "  ")
    result = take_down(store, "4", "privacy", actor="ops")
    assert result.move.previous == full and result.move.version == result.version
    again = take_down(store, "Article 4", "privacy")  # already gone from CURRENT: no second version
    assert again.version is None and again.takedown.seq == 1 and store.current().version == result.version
    assert [t.seq for t in denylist.takedowns(store, "enwiki", include_lifted=True)] == [1]


def test_deny_records_are_never_rewritten(store):
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    first = denylist.deny(store, "enwiki", 5, title="Five", actor="a", reason="r1", at=now)
    assert denylist.deny(store, "enwiki", 5, title="Five", actor="b", reason="r2", at=now) == first  # idempotent
    denylist.lift(store, "enwiki", 5, actor="c", reason="ok", at=now)
    second = denylist.deny(store, "enwiki", 5, title="Five", actor="d", reason="r3", at=now)
    assert second.seq == 2 and denylist.denied_page_ids(store, "enwiki") == {5}
    assert denylist.denied_page_ids(store, "dewiki") == frozenset()
    history = denylist.takedowns(store, "enwiki", include_lifted=True)
    assert [(t.seq, t.reason, t.active) for t in history] == [(1, "r1", False), (2, "r3", True)]
    store.fs.pipe(store.path("denylist", "enwiki", "5", "0002.json"), b"{not json")
    with pytest.raises(RagindexError, match="0002.json is unreadable"):
        denylist.takedowns(store, "enwiki")


def test_validation_rejects_a_version_serving_a_denied_page_until_lifted(store, tiny_ctx_fingerprint):
    from datetime import UTC, datetime

    passages = random_passages(60, pages=20)
    vectors = np.random.default_rng(0).standard_normal((60, tiny_ctx_fingerprint.dim)).astype(np.float32)
    denylist.deny(store, "enwiki", 7, title="Article 7", actor="ops", reason="r", at=datetime.now(UTC))
    rejected = store.manifest(make_version(store, passages, vectors, tiny_ctx_fingerprint, wiki="enwiki"))
    assert rejected.status == "rejected" and "serves page 7" in rejected.validation.reason
    denylist.lift(store, "enwiki", 7, actor="ops", reason=None, at=datetime.now(UTC))
    assert store.manifest(make_version(store, passages, vectors, tiny_ctx_fingerprint, wiki="enwiki")).status \
        == "ready"


def test_a_rollback_past_a_takedown_does_not_serve_the_page(lineage, tmp_path, tiny_dpr):
    """Serving filters denied pages at query time; and the next delta on the rolled-back version drops them."""
    store, full, delta = lineage
    result = take_down(store, "Article 5", "legal")
    assert 5 not in _served_by_search(store, result.version)
    store.rollback(full, reason="bad night")  # a version from before the takedown, which holds page 5
    assert 5 in served_page_ids(store, store.manifest(full))
    index = VersionIndex.open(store, full)
    assert index.denied == {5} and index.size == 120 - 3
    assert 5 not in _served_by_search(store, full)
    assert 5 in {h.page_id for hits in index.without_pages(()).search(
        np.random.default_rng(1).standard_normal((8, index.dim)).astype(np.float32), 200) for h in hits}

    # The next delta on the rolled-back version tombstones page 5 (and its own revision of it is left out).
    d = _apply_day(store, full, tmp_path, tiny_dpr, "20240103",
                   [HistPage(5, "Article 5", [(6000, _words("back"))]),
                    HistPage(9, "Article 9", [(6001, _words("n"))])])
    assert d.status == "ready" and d.changes["taken_down"] == [[5, "Article 5"]] and d.changes["denied"] == 1
    assert 5 not in served_page_ids(store, d) and 9 in served_page_ids(store, d)


def test_full_build_passages_leave_denied_pages_out(tmp_path):
    """The one place every build's passages get their row ids (`tasks.passages.assemble`) drops denied pages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.manifest import SourceDump
    from tasks.passages import assemble

    unit = tmp_path / "unit-000000.parquet"
    rows = {"passage_id": ["1_0", "2_0", "2_1", "3_0"], "page_id": [1, 2, 2, 3], "rev_id": [1, 1, 1, 1],
            "title": ["A", "B", "B", "C"], "text": ["a", "b", "b2", "c"], "content_hash": ["h1", "h2", "h3", "h4"]}
    pq.write_table(pa.Table.from_pydict(rows, schema=layout.UNIT_SCHEMA), unit)
    record = {"unit": {"ordinal": 0, "url": "x", "start": None, "end": None}, "options": "o", "ordinal": 0,
              "path": str(unit), "seen": 3, "kept": 3, "passages": 4, "words": 4, "seconds": 0.0}
    summary = assemble([record], Location(str(tmp_path / "out")), SourceDump(wiki="enwiki", dump_date="20240101"),
                       denied={2})
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.column("page_id").to_pylist() == [1, 3] and table.column("row_id").to_pylist() == [0, 1]
    assert summary["passages"] == 2 and summary["articles"]["skipped"] == {"denied": 1}
    assert summary["articles"]["kept"] == 2


def test_no_automatic_promote_of_a_version_built_before_a_takedown(store, tiny_ctx_fingerprint):
    from tasks.promote import NotPromoted, promote_planned

    passages = random_passages(60, pages=20)
    vectors = np.random.default_rng(0).standard_normal((60, tiny_ctx_fingerprint.dim)).astype(np.float32)
    first = make_version(store, passages, vectors, tiny_ctx_fingerprint, wiki="enwiki", promote=True)
    kept = make_version(store, passages[:-3], vectors[:-3], tiny_ctx_fingerprint, wiki="enwiki")  # not promoted
    taken = take_down(store, "Article 2", "legal")
    with pytest.raises(NotPromoted, match=f"version {kept} was built before page 2 .*taken down") as refused:
        promote_planned(store, kept, planned_generation=store.current().generation, actor="t", reason="r")
    assert refused.value.status == "denied" and store.current().version == taken.version != first
