"""A delta version built on a real full version: what it writes, how it is trusted, when it is refused."""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from flows.settings import load_settings, open_store
from rag_model.encoders import EncoderSpec
from rag_model.index import VersionIndex
from storage import layout
from storage.errors import Corrupt, Rejected
from storage.location import Location
from storage.store import IndexStore
from tasks.delta_version import NothingToApply, build_delta_version
from tasks.download import RemoteFile
from tasks.incr_dumps import IncrDay
from tasks.lineage_rows import LINEAGE_PROBES
from tasks.validate import ValidationFloors
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.models import save_tiny_dpr_encoder
from tests.fixtures.versions import make_version, random_passages


def _words(tag: str, n: int = 150) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _day(tmp_path, date: str, pages: list[HistPage]) -> tuple[IncrDay, Location]:
    path = tmp_path / f"enwiki-{date}-pages-meta-hist-incr.xml.bz2"
    path.write_bytes(bz2.compress(history_xml("enwiki", pages).encode()))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    day = IncrDay(wiki="enwiki", date=date, maxrevid=max(r for p in pages for r, _ in p.revisions),
                  location=f"file://{tmp_path}", file=RemoteFile(name=path.name, url=str(path), md5=md5))
    return day, Location(path)


@pytest.fixture
def base(tmp_path, tiny_ctx_fingerprint):
    """A ready IVF version of 40 articles (3 passages each) with the tiny DPR encoder's fingerprint."""
    store = IndexStore(str(tmp_path / "store"))
    passages = random_passages(120, pages=40)
    vectors = np.random.default_rng(0).standard_normal((120, tiny_ctx_fingerprint.dim)).astype(np.float32)
    version = make_version(store, passages, vectors, tiny_ctx_fingerprint, spec="IVF4,Flat", wiki="enwiki",
                           promote=True)
    return store, version


def test_a_delta_writes_only_the_change_and_keeps_the_trained_quantizer(base, tmp_path, tiny_dpr):
    store, parent = base
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))]),
                                            HistPage(77, "Brand new", [(5001, _words("new"))])])
    m = build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)

    assert m.status == "ready" and m.is_delta and m.first_row_id == 120
    assert m.counts["passages"] == 4 and m.counts["tombstones"] == 3  # 2+2 new rows; page 3's 3 old rows
    assert m.live_passages == 120 - 3 + 4
    tombstones = np.load(store.version_path(m.version, layout.TOMBSTONES))
    assert tombstones.tolist() == [6, 7, 8]  # page 3 held rows 6..8
    own = faiss.read_index(store.version_path(m.version, layout.INDEX_FILE))
    parent_index = faiss.read_index(store.version_path(parent, layout.INDEX_FILE))
    assert own.ntotal == 4
    np.testing.assert_array_equal(faiss.extract_index_ivf(own).quantizer.reconstruct_n(0, 4),
                                  faiss.extract_index_ivf(parent_index).quantizer.reconstruct_n(0, 4))
    assert m.index.params["quantizer_reused"] and m.index.params["derived_from"] == parent
    # Only its own files: the parent's passages and vectors are not copied.
    assert not any(f.startswith("embeddings/part-00001") for f in m.files)
    assert m.validation.checks["lineage"]["live_passages"] == 121

    index = VersionIndex.open(store, m.version)
    assert index.size == 121
    rows = {r["row_id"]: r for r in index.rows([120, 121, 122, 123])}
    assert {r["page_id"] for r in rows.values()} == {3, 77}
    queries = np.random.default_rng(1).standard_normal((20, m.encoder.dim)).astype(np.float32)
    found = {h.row_id for hits in index.search(queries, 20) for h in hits}
    assert found and not found & {6, 7, 8}


def test_a_tampered_ancestor_or_tombstone_file_is_refused(base, tmp_path, tiny_dpr):
    store, parent = base
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))])])
    m = build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)
    tomb = Path(store.version_path(m.version, layout.TOMBSTONES))
    good = tomb.read_bytes()
    np.save(tomb, np.array([], dtype=np.int64))  # resurrect page 3's old rows
    with pytest.raises(Corrupt, match="tombstones"):
        VersionIndex.open(store, m.version)
    tomb.write_bytes(good)
    assert VersionIndex.open(store, m.version).size == 120 - 3 + 2

    manifest_path = Path(store.version_path(parent, layout.MANIFEST))
    data = json.loads(manifest_path.read_text())
    data["timings"]["tampered_s"] = 1.0  # a different manifest than the one the delta was built on
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(Corrupt, match=parent):
        VersionIndex.open(store, m.version)


def _flip_a_byte(path: Path) -> bytes:
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    return good


def test_a_delta_never_trusts_a_parent_file_that_changed_after_its_commit(base, tmp_path, tiny_dpr, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a file cache of this test's own
    store, parent = base
    spec = EncoderSpec(str(tiny_dpr.ctx_dir), "dpr")
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))])])
    before = [v.version for v in store.list_versions()]

    table = Path(store.version_path(parent, layout.PASSAGE_TABLE))  # where the parent's pages are looked up
    good = _flip_a_byte(table)
    with pytest.raises(Corrupt, match=f"{parent}: {layout.PASSAGE_TABLE}"):
        build_delta_version(store, parent, [day], [path], spec=spec, progress=False)
    assert [v.version for v in store.list_versions()] == before  # nothing half-built is left
    table.write_bytes(good)

    shard = sorted(Path(store.version_path(parent, layout.EMBEDDINGS_DIR)).glob("part-*.npy"))[0]
    _flip_a_byte(shard)  # vectors validation would search and compare against
    m = build_delta_version(store, parent, [day], [path], spec=spec, progress=False)
    assert m.status == "rejected"
    assert "segment check failed" in m.validation.reason and shard.name in m.validation.reason


def test_days_that_change_nothing_make_no_version(base, tmp_path, tiny_dpr):
    store, parent = base
    before = [v.version for v in store.list_versions()]
    spec = EncoderSpec(str(tiny_dpr.ctx_dir), "dpr")
    stale, stale_path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(1003, _words("old"))]),
                                                    HistPage(999, "Talk:Article 3", [(6000, "talk")], ns=1)])
    with pytest.raises(NothingToApply, match="change nothing"):
        build_delta_version(store, parent, [stale], [stale_path], spec=spec, progress=False)
    assert [v.version for v in store.list_versions()] == before
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == sorted(before)  # no staging left

    other = EncoderSpec(str(save_tiny_dpr_encoder(tmp_path / "other", "ctx", seed=99)), "dpr")
    edit, edit_path = _day(tmp_path, "20240103", [HistPage(3, "Article 3", [(5000, _words("edited"))])])
    with pytest.raises(Rejected, match="encoder differs"):
        build_delta_version(store, parent, [edit], [edit_path], spec=other, progress=False)


def test_days_that_only_remove_pages_make_a_delta_with_no_rows_of_its_own(base, tmp_path, tiny_dpr):
    """A delta with zero own passages (one empty shard, empty vectors, an empty derived index) is built,
    validated and served: the same zero-row path a takedown version takes."""
    store, parent = base
    day, path = _day(tmp_path, "20240102", [HistPage(8, "Article 8", [(7000, "#REDIRECT [[Article 9]]")],
                                                     redirect="Article 9")])
    m = build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)
    assert m.status == "ready", m.validation.reason
    assert m.counts["passages"] == 0 and m.counts["tombstones"] == 3 and m.live_passages == 117
    assert np.load(store.version_path(m.version, layout.TOMBSTONES)).tolist() == [21, 22, 23]  # page 8's rows
    assert [p for p, _ in m.changes["redirected"]] == [8]
    index = VersionIndex.open(store, m.version)
    queries = np.random.default_rng(1).standard_normal((8, m.encoder.dim)).astype(np.float32)
    assert index.size == 117 and 8 not in {h.page_id for hits in index.search(queries, 200) for h in hits}


def test_a_done_day_whose_file_falls_short_of_its_maxrevid_is_refused(base, tmp_path, tiny_dpr):
    """status done:all, md5 right, but the file stops before the maxrevid the day published: applied as
    complete, the missing edits would be lost for good (the next night starts after this day)."""
    store, parent = base
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))])])
    partial = dataclasses.replace(day, maxrevid=5003)

    with pytest.raises(Rejected, match="maxrevid") as exc:
        build_delta_version(store, parent, [partial], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)

    assert str(exc.value) == ("adds-changes day 20240102 is marked done:all but its "
                              "enwiki-20240102-pages-meta-hist-incr.xml.bz2 holds revisions only up to 5000, "
                              "short of its maxrevid 5003: a partial file, not applied")
    assert [v.version for v in store.list_versions()] == [parent] and store.current().version == parent
    assert build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                               progress=False).status == "ready"  # the whole day applies


def test_a_delta_build_and_its_validation_use_only_the_configured_cache(base, tmp_path, tiny_dpr, monkeypatch):
    """RAGINDEX_CACHE_DIR reaches every step of a build through the store the edge opens: parent rows,
    reuse, derive, validation; nothing lands in ~/.cache."""
    store, parent = base
    home, configured = tmp_path / "home", tmp_path / "configured-cache"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("RAGINDEX_CACHE_DIR", str(configured))
    monkeypatch.setenv("RAGINDEX_CACHE_MAX_SIZE", "64MiB")
    load_settings.cache_clear()
    try:
        edge = open_store(store.url)
    finally:
        load_settings.cache_clear()
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))])])

    m = build_delta_version(edge, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)

    assert m.status == "ready" and m.validation.passed
    assert [p for p in home.rglob("*") if p.is_file()] == []
    records = {p.parent.name for p in configured.rglob("*.json")}
    assert records == {"local"}  # the parent's files, verified in place, recorded in the configured cache
    cache = edge.file_cache()
    assert cache.root.startswith(str(configured)) and cache.max_bytes == 64 * 2**20  # its bound too


def test_a_delta_measures_the_index_it_built_and_a_bounded_sample_of_its_ancestors(base, tmp_path, tiny_dpr):
    """Validation of a micro-delta costs what it changed: recall@10 of its own segment against exact search
    over its own rows, self-retrieval of its rows, and LINEAGE_PROBES rows searched through the whole
    lineage (each ancestor's index was measured when it was validated)."""
    store, parent = base
    day, path = _day(tmp_path, "20240102", [HistPage(3, "Article 3", [(5000, _words("edited"))]),
                                            HistPage(77, "Brand new", [(5001, _words("new"))])])
    m = build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)
    assert m.status == "ready", m.validation.reason
    checks = m.validation.checks
    assert checks["recall_at_10"]["scope"] == "own rows" and checks["recall_at_10"]["sample"] == 4
    assert checks["self_retrieval"]["sample"] == 4 and checks["self_retrieval"]["hit_rate"] == 1.0
    assert checks["lineage_probes"] == {"probes": LINEAGE_PROBES, "found": 1.0}  # 2 own, 6 of 117 ancestor rows


def test_a_delta_whose_own_index_retrieves_poorly_is_rejected(tmp_path, tiny_ctx_fingerprint, tiny_dpr):
    """The own-rows recall check still bites: a delta derived from a base whose 4-bit codes were accepted
    by lowered floors is measured against the default floor."""
    store = IndexStore(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, tiny_ctx_fingerprint.dim)).astype(np.float32)
    parent = make_version(store, random_passages(600, pages=200), vectors, tiny_ctx_fingerprint,
                          spec="ivfpq:m=4,nbits=4", wiki="enwiki", promote=True,
                          floors=ValidationFloors(recall_at_10=0.0, self_retrieval=0.0, allow_count_change=True))
    pages = [HistPage(1000 + i, f"New {i}", [(5000 + i, _words(f"n{i}x"))]) for i in range(50)]
    day, path = _day(tmp_path, "20240102", pages)
    m = build_delta_version(store, parent, [day], [path], spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"),
                            progress=False)
    assert m.status == "rejected" and "recall@10" in m.validation.reason, m.validation
    assert m.validation.checks["recall_at_10"]["scope"] == "own rows"
