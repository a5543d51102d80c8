"""gc and delta versions, on local disk and on S3 (a moto server): a delta serves its ancestors' rows
from their directories, so nothing a kept or protected version names in `segments` may go; once no
kept version names an ancestor, it goes like any old version. Never on doubt."""

from __future__ import annotations

import json
from datetime import timedelta

from storage.fs import atomic_write
from storage.retention import gc
from storage.verify import segment_manifests
from tests.fixtures.versions import commit_delta
from tests.test_store import commit_stub

GC = {"stale_after": timedelta(0)}


def _download(store, date: str) -> None:
    with atomic_write(store.fs, store.downloads_path("enwiki", date, "file.bz2")) as f:
        f.write(b"dump")


def _versions(store) -> list[str]:
    return [m.version for m in store.list_versions()]


def test_a_kept_delta_keeps_its_ancestors_and_only_they_outlive_the_keep_window(store):
    base = commit_stub(store, date="20240101")
    unrelated = commit_stub(store, date="20240101", payload=b"other")
    d1 = commit_delta(store, base, ["20240102"])
    d2 = commit_delta(store, d1, ["20240103", "20240104"])
    assert [s.version for s in store.manifest(d2).segments] == [base, d1]

    dry = gc(store, keep=1, dry_run=True, **GC)
    assert dry.deleted_versions == [unrelated] and dry.kept_as_segment == [base, d1] and len(_versions(store)) == 4
    report = gc(store, keep=1, **GC)
    assert report.deleted_versions == [unrelated]
    assert report.kept == [base, d1, d2] and report.kept_as_segment == [base, d1] and report.kept_in_doubt == []
    assert _versions(store) == [base, d1, d2] and not store.fs.exists(store.version_path(unrelated))
    # d2 is still servable: every segment is there, byte for byte what it was built on
    assert [m.version for m in segment_manifests(store, store.manifest(d2))] == [base, d1]
    assert store.fs.exists(store.version_path(base, "data.bin"))

    newer = commit_stub(store, date="20240201")  # a new full version: nothing kept names the chain any more
    report = gc(store, keep=1, **GC)
    assert sorted(report.deleted_versions) == sorted([base, d1, d2]) and report.kept_as_segment == []
    assert _versions(store) == [newer]
    assert not any(store.fs.exists(store.version_path(v)) for v in (base, d1, d2))


def test_deltas_are_deleted_before_the_ancestors_they_share_rows_with(store, monkeypatch):
    """If gc dies half way, no remaining version names a deleted one as its segment."""
    base = commit_stub(store)
    d1 = commit_delta(store, base, ["20240102"])
    d2 = commit_delta(store, d1, ["20240103"])
    commit_stub(store, date="20240201")
    removed: list[str] = []
    real_rm_file = store.fs.rm_file

    def recording_rm_file(path, *args, **kwargs):
        if path.endswith("/manifest.json"):
            removed.append(path.rstrip("/").rsplit("/", 2)[-2])
        return real_rm_file(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "rm_file", recording_rm_file)
    report = gc(store, keep=1, **GC)
    assert removed == [d2, d1, base]
    assert report.deleted_versions == [base, d1, d2]  # reported oldest first, as ever


def test_a_protected_delta_keeps_its_segments(store):
    base = commit_stub(store)
    old = commit_stub(store, payload=b"old")
    delta = commit_delta(store, base, ["20240102", "20240103"])
    store.promote(old)
    store.promote(delta)  # CURRENT delta, previous old
    doomed = commit_stub(store, date="20240201")
    newest = commit_stub(store, date="20240201", payload=b"newest")
    report = gc(store, keep=1, **GC)
    assert report.deleted_versions == [doomed]
    assert report.kept_as_segment == [base] and sorted(report.kept) == sorted([base, old, delta, newest])

    store.promote(newest)  # CURRENT newest, previous delta: still protected, and so its base
    assert gc(store, keep=1, **GC).deleted_versions == [old]
    assert _versions(store) == [base, delta, newest]
    store.pin(delta)
    later, latest = commit_stub(store, date="20240301"), commit_stub(store, date="20240302")
    store.promote(later)
    store.promote(latest)  # delta is neither CURRENT nor previous now, but pinned
    report = gc(store, keep=1, **GC)
    assert report.deleted_versions == [newest] and report.kept_as_segment == [base]
    store.unpin(delta)
    assert sorted(gc(store, keep=1, **GC).deleted_versions) == sorted([base, delta])


def test_a_delta_promoted_on_a_doomed_version_while_gc_runs_keeps_it(store, monkeypatch):
    """gc planned from a scan; a refresh then commits and promotes a delta on an old version gc meant to
    delete. The protected set re-read under the pointer lock includes CURRENT's segments."""
    old = commit_stub(store)
    newest = commit_stub(store, payload=b"newest")
    real_scan = store.scan_versions
    late: list[str] = []

    def scan_then_a_refresh_lands():
        result = real_scan()
        late.append(commit_delta(store, old, ["20240102"]))
        store.promote(late[0])
        return result

    monkeypatch.setattr(store, "scan_versions", scan_then_a_refresh_lands)
    report = gc(store, keep=1, **GC)
    monkeypatch.undo()
    assert report.deleted_versions == [] and set(_versions(store)) == {old, newest, late[0]}
    assert [m.version for m in segment_manifests(store, store.manifest(late[0]))] == [old]


def test_downloads_of_a_kept_lineage_survive_and_go_with_it(store):
    base = commit_stub(store, date="20240101")
    delta = commit_delta(store, base, ["20240102", "20240103", "20240104"])
    for date in ("20231201", "20240101", "20240102", "20240103", "20240104"):
        _download(store, date)
    report = gc(store, keep=1, **GC)
    assert report.deleted_downloads == ["enwiki/20231201"]  # the base dump and every applied day stay
    for date in ("20240101", "20240102", "20240103", "20240104"):
        assert store.fs.exists(store.downloads_path("enwiki", date, "file.bz2")), date

    commit_stub(store, date="20240201")
    _download(store, "20240201")
    report = gc(store, keep=1, **GC)
    assert sorted(report.deleted_versions) == sorted([base, delta])
    assert sorted(report.deleted_downloads) == [f"enwiki/{d}" for d in ("20240101", "20240102", "20240103",
                                                                       "20240104")]
    assert store.fs.exists(store.downloads_path("enwiki", "20240201", "file.bz2"))


def test_a_current_delta_whose_manifest_is_unreadable_keeps_everything(store):
    base = commit_stub(store)
    other = commit_stub(store, payload=b"other")
    delta = commit_delta(store, base, ["20240102"])
    store.promote(delta)
    newest = commit_stub(store, date="20240201")
    _download(store, "20231201")
    with atomic_write(store.fs, store.version_path(delta, "manifest.json")) as f:
        f.write(b'{"version": "truncated')  # which versions does it share rows with? nobody can say
    report = gc(store, keep=1, **GC)
    assert report.deleted_versions == [] and report.deleted_corrupt == [] and report.deleted_downloads == []
    assert report.kept_in_doubt == [base, other] and report.kept_as_segment == []
    assert set(_versions(store)) == {base, other, newest}
    assert store.fs.exists(store.downloads_path("enwiki", "20231201", "file.bz2"))


def test_a_manifest_that_fails_validation_is_still_read_for_its_segments(store):
    base = commit_stub(store)
    other = commit_stub(store, payload=b"other")
    delta = commit_delta(store, base, ["20240102"])
    store.promote(delta)
    commit_stub(store, date="20240201")
    _download(store, "20231201")
    path = store.version_path(delta, "manifest.json")
    with store.fs.open(path, "rb") as f:
        doc = json.loads(f.read())
    doc["status"] = "half-written"  # no longer a valid manifest, but its segments are still legible
    with atomic_write(store.fs, path) as f:
        f.write(json.dumps(doc).encode())
    report = gc(store, keep=1, **GC)
    assert report.deleted_versions == [other] and report.kept_as_segment == [base] and report.kept_in_doubt == []
    assert report.deleted_downloads == ["enwiki/20231201"]  # its lineage's days and base are legible too
    assert store.fs.exists(store.version_path(base, "data.bin"))


def test_a_corrupt_ancestor_of_a_kept_delta_is_not_collected(store):
    base = commit_stub(store)
    delta = commit_delta(store, base, ["20240102"])
    with atomic_write(store.fs, store.version_path(base, "manifest.json")) as f:
        f.write(b"[1, 2")
    report = gc(store, keep=1, **GC)
    assert report.deleted_corrupt == [] and report.kept_as_segment == [base]
    assert store.fs.exists(store.version_path(base, "data.bin"))
    commit_stub(store, date="20240201")
    report = gc(store, keep=1, **GC)  # nothing kept names it any more: corrupt manifests go, as ever
    assert report.deleted_versions == [delta] and report.deleted_corrupt == [base]
    assert not store.fs.exists(store.version_path(base))
