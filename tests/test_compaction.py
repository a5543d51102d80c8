"""Compaction: a delta lineage becomes one version that serves the same rows, with the same answers, without
encoding or retraining; gc frees the merged segments only when no kept version refers to them; rolling back
across a compaction is a pointer move; a `ragindex compact` killed before its commit leaves nothing visible and a
re-run finishes, on local disk and on the moto S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from cli.store import versions_report
from rag_model.encoders import EncoderSpec
from rag_model.index import VersionIndex
from storage import layout, retention
from storage.errors import NotFound
from storage.manifest import Lineage, Manifest
from storage.store import IndexStore
from storage.verify import lineage_manifests
from tasks.compact_version import CompactionPolicy, Due, NothingToCompact, compact_version
from tasks.delta_version import build_delta_version, lineage_removals, net_changes
from tasks.promote import promote_version, rollback_version
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.kills import child_env, kill_when, leftovers, staging_versions, stopping_at
from tests.fixtures.versions import make_version, random_passages
from tests.test_delta_version import _day


def _words(tag: str, n: int = 150) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _lineage_of_three_deltas(store: IndexStore, tmp_path, tiny_dpr, fingerprint) -> tuple[str, list[str]]:
    """An IVF base of 40 articles, then three promoted deltas: edits, a new page edited again, a redirect."""
    passages = random_passages(120, pages=40)
    vectors = np.random.default_rng(0).standard_normal((120, fingerprint.dim)).astype(np.float32)
    base = make_version(store, passages, vectors, fingerprint, spec="IVF4,Flat", wiki="enwiki", promote=True)
    spec = EncoderSpec(str(tiny_dpr.ctx_dir), "dpr")
    days = [
        [HistPage(3, "Article 3", [(5000, _words("edited"))]), HistPage(77, "Brand new", [(5001, _words("new"))])],
        [HistPage(77, "Brand new", [(5002, _words("again"))]), HistPage(5, "Article 5", [(5003, _words("five"))])],
        [HistPage(9, "Article 9", [(5004, "#REDIRECT [[Article 5]]")], redirect="Article 5"),
         HistPage(12, "Article 12", [(5005, _words("twelve"))])],
    ]
    parent, deltas = base, []
    for i, pages in enumerate(days):
        (tmp_path / f"d{i}").mkdir()
        day, path = _day(tmp_path / f"d{i}", f"2024010{i + 2}", pages)
        m = build_delta_version(store, parent, [day], [path], spec=spec, progress=False)
        promote_version(store, m.version, actor="tests")
        parent = m.version
        deltas.append(m.version)
    return base, deltas


def _queries(dim: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((30, dim)).astype(np.float32)


def _answers(index: VersionIndex, queries: np.ndarray) -> list[list[tuple]]:
    """What a reader is served for each query: the top 10 hits, cited to their revision."""
    return [[(h.page_id, h.passage_id, h.rev_id, h.text, round(h.score, 4)) for h in hits]
            for hits in index.search(queries, 10)]


@pytest.fixture
def lineage(store, tmp_path, tiny_dpr, tiny_ctx_fingerprint):
    base, deltas = _lineage_of_three_deltas(store, tmp_path, tiny_dpr, tiny_ctx_fingerprint)
    return store, base, deltas


def test_compaction_serves_the_same_rows_and_answers_from_one_segment(lineage):
    store, base, deltas = lineage
    delta = store.manifest(deltas[-1])
    compacted = compact_version(store, delta.version, progress=False)

    assert compacted.status == "ready" and not compacted.is_delta and compacted.segments == []
    assert compacted.compacted_from == delta.version and compacted.parent == delta.version
    assert compacted.lineage == delta.lineage and compacted.content == delta.content  # the same knowledge
    assert compacted.changes == net_changes(lineage_manifests(store, delta))
    assert compacted.counts["passages"] == delta.live_passages
    assert compacted.counts["encoded"] == 0 and compacted.counts["segments_merged"] == 4
    assert compacted.counts["tombstones_dropped"] == delta.counts["tombstones"] > 0
    assert not any(f == layout.TOMBSTONES for f in compacted.files)
    # The base's trained quantizer, never retrained.
    own = faiss.read_index(store.version_path(compacted.version, layout.INDEX_FILE)) \
        if store.location.is_local else None
    if own is not None:
        base_index = faiss.read_index(store.version_path(base, layout.INDEX_FILE))
        np.testing.assert_array_equal(faiss.extract_index_ivf(own).quantizer.reconstruct_n(0, 4),
                                      faiss.extract_index_ivf(base_index).quantizer.reconstruct_n(0, 4))
    assert compacted.index.params["quantizer_reused"] and compacted.index.params["derived_from"] == base

    before, after = VersionIndex.open(store, delta.version), VersionIndex.open(store, compacted.version)
    assert len(after.segments) == 1 and len(before.segments) == 4 and after.size == before.size
    queries = _queries(delta.encoder.dim)
    assert _answers(after, queries) == _answers(before, queries)
    pages = {r["page_id"]: r for r in after.rows(list(range(after.size)))}
    assert 9 not in pages and pages[77]["rev_id"] == 5002 and pages[3]["rev_id"] == 5000  # redirect gone, edits kept


def test_a_delta_on_a_compaction_and_rollback_across_it_are_pointer_moves(lineage, tmp_path, tiny_dpr):
    store, base, deltas = lineage
    compacted = compact_version(store, deltas[-1], progress=False)
    promote_version(store, compacted.version, actor="tests")
    day, path = _day(tmp_path, "20240105", [HistPage(20, "Article 20", [(5006, _words("twenty"))])])
    after = build_delta_version(store, compacted.version, [day], [path],
                                spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"), progress=False)
    assert [s.version for s in after.segments] == [compacted.version]
    assert after.lineage.base_version == base and [d.date for d in after.lineage.days][-1] == "20240105"
    promote_version(store, after.version, actor="tests")

    move = rollback_version(store, deltas[-1], actor="tests", reason="across the compaction")
    assert move.version == deltas[-1] and store.current().version == deltas[-1]
    assert VersionIndex.open(store, deltas[-1]).size == store.manifest(deltas[-1]).live_passages


def test_gc_frees_merged_segments_only_when_no_kept_version_refers_to_them(lineage, tmp_path, tiny_dpr):
    store, base, deltas = lineage
    compacted = compact_version(store, deltas[-1], progress=False)
    promote_version(store, compacted.version, actor="tests")
    # CURRENT the compaction, previous the last delta: that delta still needs every merged segment.
    report = retention.gc(store, keep=1)
    assert not report.deleted_versions
    day, path = _day(tmp_path, "20240105", [HistPage(20, "Article 20", [(5006, _words("twenty"))])])
    after = build_delta_version(store, compacted.version, [day], [path],
                                spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"), progress=False)
    promote_version(store, after.version, actor="tests")
    # CURRENT a delta of the compaction, previous the compaction: nothing kept refers to the old lineage.
    report = retention.gc(store, keep=1)
    assert sorted(report.deleted_versions) == sorted([base, *deltas])
    assert {m.version for m in store.list_versions()} == {compacted.version, after.version}
    assert VersionIndex.open(store, after.version).size == after.live_passages


@pytest.mark.parametrize("store_backend", ["local"], indirect=True)  # refused before any file is read
def test_only_a_ready_delta_is_compacted(lineage):
    store, base, _ = lineage
    with pytest.raises(NothingToCompact, match="one segment already"):
        compact_version(store, base, progress=False)
    with pytest.raises(NotFound):
        compact_version(store, "enwiki-20240101-20990101t000000z", progress=False)
    assert all(not m.compacted_from for m in store.list_versions())


def _manifest_with(segments: int, tombstones: int, live: int) -> Manifest:
    from storage.manifest import IndexInfo, SegmentRef, SourceDump
    from tests.fixtures.versions import fingerprint_for

    refs = [SegmentRef(version=f"v{i}", manifest_sha256="0" * 64, first_row_id=i, rows=1) for i in range(segments - 1)]
    return Manifest(version="v", status="ready", source=SourceDump(wiki="enwiki", dump_date="20240101"),
                    encoder=fingerprint_for(8), index=IndexInfo(spec="flat", factory="Flat", metric="ip", dim=8),
                    counts={"tombstones": tombstones, "live_passages": live}, segments=refs,
                    lineage=Lineage(base_version="v0", base_dump="20240101"))


def test_the_policy_says_when_a_lineage_is_due_and_how_to_compact_it():
    policy = CompactionPolicy(max_segments=32, max_tombstone_share=0.2, min_tombstones=21)
    assert policy.due(_manifest_with(32, 0, 100)) is None
    assert policy.due(_manifest_with(33, 0, 100)) == Due("33 segments (budget 32)", keep_base=True)
    assert policy.due(_manifest_with(3, 20, 80)) is None
    assert policy.due(_manifest_with(3, 21, 79)) == Due("21% of its rows are tombstoned (budget 20%)", keep_base=False)
    # Past both budgets, the dead rows decide: only a merge of everything drops the base's.
    assert policy.due(_manifest_with(40, 21, 79)).keep_base is False
    assert CompactionPolicy(min_tombstones=22).due(_manifest_with(3, 21, 79)) is None  # too few to be worth it
    # One delta on its base is as small as a merge above the base can make it: past a budget of 1, merge all.
    assert CompactionPolicy(max_segments=1).due(_manifest_with(2, 0, 100)).keep_base is False


def test_compaction_above_the_base_shares_the_base_and_serves_the_same_answers(lineage, tmp_path, tiny_dpr):
    store, base, deltas = lineage
    delta = store.manifest(deltas[-1])
    compacted = compact_version(store, delta.version, keep_base=True, progress=False)

    assert compacted.status == "ready", compacted.validation
    assert compacted.mode == "compaction" and compacted.compacted_from == delta.version
    assert compacted.segments == delta.segments[:1] and compacted.segments[0].version == base  # the base, as pinned
    assert compacted.lineage == delta.lineage and compacted.content == delta.content
    assert compacted.first_row_id == delta.next_row_id  # row ids are never reused in a lineage
    base_rows = store.manifest(base).counts["passages"]
    tombstones = np.load(store.fs.open(store.version_path(delta.version, layout.TOMBSTONES), "rb"))
    kept = np.load(store.fs.open(store.version_path(compacted.version, layout.TOMBSTONES), "rb"))
    np.testing.assert_array_equal(kept, tombstones[tombstones < base_rows])  # only the base's dead rows stay
    assert compacted.counts["tombstones_dropped"] == len(tombstones) - len(kept) > 0
    assert compacted.counts["segments_merged"] == 3 and compacted.counts["encoded"] == 0
    assert compacted.counts["passages"] == delta.live_passages - (base_rows - len(kept))
    assert compacted.index.params["quantizer_reused"] and compacted.index.params["derived_from"] == base

    before, after = VersionIndex.open(store, delta.version), VersionIndex.open(store, compacted.version)
    assert len(after.segments) == 2 and after.size == before.size == compacted.live_passages
    queries = _queries(delta.encoder.dim)
    assert _answers(after, queries) == _answers(before, queries)

    # It is a delta like any: the next one stacks on it, and gc frees the merged segments, never the base.
    promote_version(store, compacted.version, actor="tests")
    day, path = _day(tmp_path, "20240105", [HistPage(20, "Article 20", [(5006, _words("twenty"))])])
    after_it = build_delta_version(store, compacted.version, [day], [path],
                                   spec=EncoderSpec(str(tiny_dpr.ctx_dir), "dpr"), progress=False)
    assert [s.version for s in after_it.segments] == [base, compacted.version]
    promote_version(store, after_it.version, actor="tests")
    report = retention.gc(store, keep=1)
    assert sorted(report.deleted_versions) == sorted(deltas)
    assert VersionIndex.open(store, after_it.version).size == after_it.live_passages
    with pytest.raises(NothingToCompact, match="one segment on its base already"):
        compact_version(store, compacted.version, keep_base=True, progress=False)


@pytest.mark.parametrize("store_backend", ["local"], indirect=True)
def test_ragindex_compact_keep_base_merges_above_the_base_and_promotes(lineage, store_url, tmp_path):
    store, base, deltas = lineage
    done = subprocess.run([str(Path(sys.executable).parent / "ragindex"), "compact", "--keep-base", "--store",
                           store_url], env=child_env(RAGINDEX_CACHE_DIR=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    compacted = store.manifest(store.current().version)
    assert f"compacted {deltas[-1]} (3 segments above its base" in done.stdout
    assert compacted.compacted_from == deltas[-1] and [s.version for s in compacted.segments] == [base]


@pytest.mark.parametrize("store_backend", ["local"], indirect=True)  # the copy's logic; both stores run it above
@pytest.mark.parametrize("keep_base", [False, True])
def test_a_lineage_ending_in_a_version_with_no_rows_of_its_own_compacts(lineage, keep_base):
    """A takedown (or a removals-only delta) adds a segment of no rows: its empty vectors end the copy."""
    from tasks.takedown import take_down

    store, base, deltas = lineage
    done = take_down(store, "Article 12", "a court order", actor="tests")
    source = store.manifest(done.version)
    assert source.counts["passages"] == 0 and len(source.segments) == 4
    compacted = compact_version(store, source.version, keep_base=keep_base, progress=False)
    assert compacted.status == "ready", compacted.validation
    before, after = VersionIndex.open(store, source.version), VersionIndex.open(store, compacted.version)
    assert after.size == before.size == source.live_passages
    assert _answers(after, _queries(source.encoder.dim)) == _answers(before, _queries(source.encoder.dim))


def _changes_of(version: str, changes: dict) -> Manifest:
    return _manifest_with(1, 0, 1).model_copy(update={"version": version, "changes": changes, "segments": []})


def test_a_compaction_carries_the_page_removals_of_the_versions_it_merges():
    """A page a merged delta removed stays removed for the lineage (an older revision must not bring it back),
    and one a later delta brought back stays served: `lineage_removals` answers the same over the compaction."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        manifests = []
        for i in range(int(rng.integers(1, 6))):
            changes: dict[str, list] = {"added": [], "changed": [], "moved": [], "removed": []}
            for page in rng.choice(8, size=int(rng.integers(0, 5)), replace=False).tolist():
                kind = ["added", "changed", "moved", "removed"][int(rng.integers(4))]
                changes[kind].append([page, 100 * trial + i, f"P{page}"] if kind == "removed" else [page, f"P{page}"])
            manifests.append(_changes_of(f"v{i}", changes))
        want = lineage_removals(manifests)
        assert lineage_removals([_changes_of("all", net_changes(manifests))]) == want
        kept = manifests[:1]  # merged above the base: the base keeps its own changes
        assert lineage_removals([*kept, _changes_of("tail", net_changes(manifests[1:]))]) == want


@pytest.mark.parametrize("store_backend", ["local"], indirect=True)
def test_the_nightly_compacts_a_lineage_past_its_budget(prefect_api, mirror, tiny_dpr, gensim_excerpt, store,
                                                        store_url, monkeypatch, request):
    """Through refresh-index: a delta past RAGINDEX_COMPACT_SEGMENTS is promoted, then compacted and the
    compaction promoted in the same run; the next night is up to date on it."""
    from flows.refresh import refresh_index
    from flows.settings import load_settings
    from tests.fixtures.incr_mirror import make_incr_day
    from tests.test_delta_flow import _articles, _served

    monkeypatch.setenv("RAGINDEX_COMPACT_SEGMENTS", "1")
    load_settings.cache_clear()
    request.addfinalizer(load_settings.cache_clear)
    common = dict(wiki="enwiki", mirror=mirror.url, store_url=store_url, encoder=str(tiny_dpr.ctx_dir),
                  encoder_kind="dpr", index_spec="flat", shard_rows=50, allow_count_change=True)
    pages = _articles(gensim_excerpt, n=8)
    mirror.add_run("enwiki", "20240101", pages)
    full = refresh_index(**common)
    rev = max(p.revision for p in pages) + 1
    day = [HistPage(pages[0].page_id, pages[0].title, [(rev, pages[0].text + "\n\nA compacted sentence .")])]
    make_incr_day(mirror.root, "enwiki", "20240102", history_xml("enwiki", day), maxrevid=rev)

    night = refresh_index(**common)
    assert night["status"] == "promoted" and night["mode"] == "delta"
    compaction = night["compaction"]
    assert compaction["status"] == "promoted" and "2 segments (budget 1)" in compaction["due"]
    compacted = store.manifest(compaction["version"])
    assert store.current().version == compacted.version and night["current"] == compacted.version
    assert compacted.compacted_from == night["version"] and not compacted.is_delta
    assert _served(store, compacted.version) == _served(store, night["version"])
    assert [h.action for h in store.history()][-2:] == ["promote", "promote"]
    assert store.manifest(full["version"]).status == "ready"

    idle = refresh_index(**common)
    assert idle["status"] == "up-to-date" and store.current().version == compacted.version

    # Two more nights on a budget of 2: the second makes 3 segments, and only the two above the base merge.
    monkeypatch.setenv("RAGINDEX_COMPACT_SEGMENTS", "2")
    load_settings.cache_clear()
    for date, page in (("20240103", pages[1]), ("20240104", pages[2])):
        rev += 1
        day = [HistPage(page.page_id, page.title, [(rev, page.text + f"\n\nA sentence of {date} .")])]
        make_incr_day(mirror.root, "enwiki", date, history_xml("enwiki", day), maxrevid=rev)
        night = refresh_index(**common)
        assert night["status"] == "promoted" and night["mode"] == "delta"
    compaction = night["compaction"]
    assert compaction["status"] == "promoted" and compaction["above_base"] and "3 segments" in compaction["due"]
    above = store.manifest(compaction["version"])
    assert [s.version for s in above.segments] == [compacted.version] and above.compacted_from == night["version"]
    assert store.current().version == above.version
    assert _served(store, above.version) == _served(store, night["version"])


def _holds(*patterns: str, without: tuple[str, ...] = ()) -> Callable[[IndexStore, str], bool]:
    """A staging area holds a file matching each of `patterns`, and none of `without`."""
    def holds(store: IndexStore, version: str) -> bool:
        return all(store.fs.glob(store.version_path(version, p)) for p in patterns) \
            and not any(store.fs.exists(store.version_path(version, p)) for p in without)
    return holds


def _begun_since(earlier: list[str], holds: Callable[[IndexStore, str], bool]) -> Callable[[IndexStore], bool]:
    """The sign of a moment: a staging area that none of the `earlier` runs began holds what `holds` asks."""
    earlier = set(earlier)
    return lambda store: any(holds(store, v) for v in staging_versions(store) if v not in earlier)


# Where a `ragindex compact` is killed: the call it stops itself at (a compaction this small is over in a tenth
# of a second, too soon to be caught in flight), and what its staging area holds by then.
KILL_MOMENTS = {
    # its version id reserved (the staging marker written), the build lock not taken yet
    "reserved": ("storage.store:IndexStore.begin_version", "after", _holds()),
    # its staging version half written: live passages and a shard of copied vectors, the segments' units in _work/
    "staging": ("tasks.compact_version:write_embedding_shard", "after",
                _holds(f"{layout.PASSAGES_DIR}/part-*.parquet", f"{layout.EMBEDDINGS_DIR}/part-*.npy",
                       f"{layout.WORK_DIR}/segment-*.parquet")),
    # every file built, the manifest drafted and validated, not written
    "validated": ("storage.store:IndexStore.commit_version", "before",
                  _holds(layout.INDEX_FILE, layout.PASSAGE_TABLE, f"{layout.EMBEDDINGS_DIR}/{layout.HASH_KEYS}",
                         without=(layout.WORK_DIR, layout.MANIFEST))),
}


def _operator_view(store: IndexStore, queries: np.ndarray) -> dict:
    """What operators and readers rely on: CURRENT, `ragindex versions --json`, what the store's API counts as a
    version (a readable manifest, or a corrupt one), the version a run finds holding CURRENT's content, and
    the answers served."""
    store.fs.invalidate_cache()  # s3fs caches listings: the child's writes must be seen
    current = store.current()
    served = store.manifest(current.version)
    visible, corrupt = store.scan_versions()
    return {"current": current, "versions --json": versions_report(store), "visible": [m.version for m in visible],
            "corrupt": corrupt, "latest ready": store.latest_ready().version,
            "ready with its content": store.ready_with(served.content).version,
            "answers": _answers(VersionIndex.open(store, current.version), queries)}


@pytest.mark.slow
def test_a_killed_compaction_leaves_nothing_visible_and_a_rerun_finishes(lineage, store_url, s3_endpoint, tmp_path):
    """SIGKILL a real `ragindex compact` at each moment of its compaction: nothing an operator or a reader sees
    changes; a re-run compacts and promotes; what the killed runs left is the staging areas gc removes."""
    store, base, deltas = lineage
    delta = store.manifest(deltas[-1])
    queries = _queries(delta.encoder.dim)
    before = _operator_view(store, queries)
    assert before["current"].version == delta.version and before["visible"] == [base, *deltas]
    env = child_env(RAGINDEX_CACHE_DIR=str(tmp_path / "cache"),
                    **({"RAGINDEX_S3_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {}))
    ragindex = str(Path(sys.executable).parent / "ragindex")

    killed: list[str] = []
    for moment, (call, when, holds) in KILL_MOMENTS.items():
        kill_when(_begun_since(killed, holds), [*stopping_at(call, when), "compact", "--store", store_url], env, store,
                  tmp_path / f"killed-{moment}.log", timeout=120)
        [left] = [v for v in staging_versions(store) if v not in killed]
        killed.append(left)
        assert _operator_view(store, queries) == before, moment
        assert not store.has_version(left) and store.building() is None, moment  # its lease died with it
        with pytest.raises(NotFound):
            VersionIndex.open(store, left)

    rerun = subprocess.run([ragindex, "compact", "--store", store_url], env=env, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    pointer = store.current()
    assert pointer.generation == before["current"].generation + 1 and pointer.previous == delta.version
    compacted = store.manifest(pointer.version)
    assert compacted.status == "ready" and compacted.compacted_from == delta.version and not compacted.is_delta
    served = VersionIndex.open(store, compacted.version)
    assert len(served.segments) == 1 and served.size == delta.live_passages
    assert _answers(served, queries) == before["answers"]
    assert [m.version for m in store.list_versions()] == [*before["visible"], compacted.version]
    assert set(compacted.files) == set(store.version_files(compacted.version))

    # A killed build's staging area is left to gc (it is not resumed): invisible, and removed once idle.
    assert sorted(staging_versions(store)) == sorted(killed)
    gc = subprocess.run([ragindex, "gc", "--keep", "10", "--stale-hours", "0", "--json", "--store", store_url],
                        env=env, capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stdout + gc.stderr
    report = json.loads(gc.stdout)
    assert sorted(report["deleted_staging"]) == sorted(killed) and report["deleted_versions"] == []
    assert leftovers(store) == []
    assert sorted(store.version_ids()) == sorted([*before["visible"], compacted.version])


@pytest.mark.slow
def test_a_compaction_killed_before_its_promote_is_promoted_by_the_rerun(lineage, store_url, s3_endpoint, tmp_path):
    """Killed between its commit and its promote, a compaction is a ready version nobody serves; the re-run
    promotes that very version instead of building a second copy of every live row."""
    store, base, deltas = lineage
    before = store.current()
    env = child_env(RAGINDEX_CACHE_DIR=str(tmp_path / "cache"),
                    **({"RAGINDEX_S3_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {}))

    def committed(store: IndexStore) -> bool:
        store.fs.invalidate_cache()
        return any(m.compacted_from == deltas[-1] for m in store.list_versions())

    kill_when(committed, [*stopping_at("tasks.promote:promote_planned", "before"), "compact", "--store", store_url],
              env, store, tmp_path / "killed.log", timeout=120)
    [compacted] = [m for m in store.list_versions() if m.compacted_from == deltas[-1]]
    assert compacted.status == "ready" and store.current() == before

    rerun = subprocess.run([str(Path(sys.executable).parent / "ragindex"), "compact", "--store", store_url], env=env,
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    pointer = store.current()
    assert (pointer.version, pointer.generation, pointer.previous) == \
        (compacted.version, before.generation + 1, deltas[-1])
    assert [m.version for m in store.list_versions()] == [base, *deltas, compacted.version]
