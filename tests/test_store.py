"""The version store on local disk and on S3 (a moto server process): every test runs on both."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from storage.errors import Conflict, InvalidName, NotFound, Rejected
from storage.fs import atomic_write
from storage.manifest import IndexInfo, Manifest, SourceDump
from storage.pointer import create_json, read_json, swap_json
from storage.retention import gc
from storage.store import IndexStore
from tests.fixtures.versions import fingerprint_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit_stub(store: IndexStore, status: str = "ready", date: str = "20240101", payload: bytes = b"abc") -> str:
    """A small committed version (no index; the store does not look inside files)."""
    vid = store.begin_version("enwiki", date)
    with store.fs.open(store.version_path(vid, "data.bin"), "wb") as f:
        f.write(payload)
    manifest = Manifest(version=vid, status=status, source=SourceDump(wiki="enwiki", dump_date=date),
                        encoder=fingerprint_for(4), index=IndexInfo(spec="flat", factory="Flat", dim=4),
                        counts={"passages": 1}, files={"data.bin": hashlib.sha256(payload).hexdigest()})
    store.commit_version(manifest)
    return vid


def test_staging_is_invisible_until_the_manifest_is_written(store):
    vid = store.begin_version("enwiki", "20240101")
    with store.fs.open(store.version_path(vid, "data.bin"), "wb") as f:
        f.write(b"partial")
    assert store.list_versions() == [] and not store.has_version(vid) and store.is_staging(vid)
    with pytest.raises(NotFound):
        store.manifest(vid)
    manifest = Manifest(version=vid, status="ready", source=SourceDump(wiki="enwiki", dump_date="20240101"),
                        encoder=fingerprint_for(4), index=IndexInfo(spec="flat", factory="Flat", dim=4))
    store.commit_version(manifest)
    assert [m.version for m in store.list_versions()] == [vid]
    assert store.version_files(vid) == ["data.bin"]
    with pytest.raises(Conflict):
        store.commit_version(manifest)  # versions are immutable


def test_checksums_and_ids_are_unique_within_one_second(store):
    a, b = commit_stub(store, payload=b"one"), commit_stub(store, payload=b"two")
    assert a != b and [m.version for m in store.list_versions()] == [a, b]
    import hashlib

    assert store.checksums(a) == {"data.bin": hashlib.sha256(b"one").hexdigest()}
    assert store.version_bytes(b) == 3


@pytest.mark.parametrize("bad", ["../etc", "a/b", "UPPER", "", "x..y", "a b"])
def test_names_from_outside_are_refused_before_touching_a_path(store, bad):
    for call in (store.manifest, store.pin, store.promote, store.version_path):
        with pytest.raises(InvalidName):
            call(bad)
    with pytest.raises(InvalidName):
        store.downloads_path(bad or "x y", "20240101")


def test_promote_history_and_rollback(store):
    a, b = commit_stub(store), commit_stub(store)
    p1 = store.promote(a, expected_generation=0, actor="alice", reason="first")
    assert (p1.version, p1.previous, p1.generation) == (a, None, 1)
    with pytest.raises(Conflict, match="generation 1, not 0"):
        store.promote(b, expected_generation=0)
    store.promote(b, expected_generation=1)
    back = store.rollback(reason="bad answers")
    assert (back.version, back.previous, back.generation) == (a, b, 3)
    history = store.history()
    assert [(h.generation, h.action, h.from_version, h.to_version) for h in history] == [
        (1, "promote", None, a), (2, "promote", a, b), (3, "rollback", b, a)]
    assert history[0].actor == "alice" and history[2].reason == "bad answers"


def test_rejected_and_missing_versions_are_never_current(store):
    good, bad = commit_stub(store), commit_stub(store, status="rejected")
    with pytest.raises(Rejected, match="rejected"):
        store.promote(bad)
    with pytest.raises(NotFound):
        store.rollback()  # no CURRENT yet
    store.promote(good)
    with pytest.raises(Rejected):
        store.rollback(bad)
    with pytest.raises(NotFound):
        store.rollback("enwiki-20240101-20000101t000000z")
    with pytest.raises(NotFound, match="no previous"):
        store.rollback()
    assert store.current().version == good and len(store.history()) == 1


def test_compare_and_swap_refuses_a_stale_token(store):
    """The S3 path is a conditional PutObject (If-Match / If-None-Match) sent to the moto server."""
    path = store.path("cas-probe")
    create_json(store.fs, path, {"generation": 1})
    with pytest.raises(Conflict):
        create_json(store.fs, path, {"generation": 99})  # If-None-Match: * on S3, link() locally
    data, token = read_json(store.fs, path)
    assert data == {"generation": 1}

    def expect(gen):
        def check(current):
            if (current or {}).get("generation") != gen:
                raise Conflict("moved")
        return check

    swap_json(store.fs, path, expect(1), {"generation": 2}, token)
    with pytest.raises(Conflict):
        swap_json(store.fs, path, expect(1), {"generation": 3}, token)  # stale ETag / stale content
    assert read_json(store.fs, path)[0] == {"generation": 2}


def _race(url: str, endpoint: str | None, version: str, generation: int, barrier, results) -> None:
    store = IndexStore(url, s3_endpoint_url=endpoint)  # its own S3 client: nothing shared across fork
    barrier.wait()
    try:
        store.promote(version, expected_generation=generation, actor=f"racer-{os.getpid()}")
        results.put(("won", version))
    except Conflict as exc:
        results.put(("conflict", str(exc)))


def test_two_processes_racing_to_promote(store, store_url, s3_endpoint):
    versions = [commit_stub(store) for _ in range(3)]
    store.promote(versions[0])
    ctx = multiprocessing.get_context("fork")
    for _ in range(3):  # several rounds, so a lucky interleaving cannot hide a torn swap
        gen = store.current().generation
        contenders = [v for v in versions if v != store.current().version]
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(store_url, s3_endpoint, v, gen, barrier, results))
                 for v in contenders]
        for p in procs:
            p.start()
        outcome = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sorted(o[0] for o in outcome) == ["conflict", "won"], outcome
        winner = next(o[1] for o in outcome if o[0] == "won")
        raw = json.loads(store.fs.cat_file(store.path("CURRENT")))  # whole, valid JSON
        assert raw["version"] == winner and raw["generation"] == gen + 1
        assert store.manifest(winner).status == "ready"
    history = store.history()
    assert [h.generation for h in history] == [1, 2, 3, 4]  # one entry per win, none for the losers


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from storage.store import IndexStore
    store = IndexStore(sys.argv[1], s3_endpoint_url=sys.argv[2] or None)
    vid = store.begin_version("enwiki", "20240101")
    for name in ("index.faiss", "passages.arrow"):
        with store.fs.open(store.version_path(vid, name), "wb") as f:
            f.write(b"x" * 1000)
    print(vid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies between writing the files and the manifest
""")


def test_a_build_killed_before_its_manifest_leaves_no_version_and_gc_cleans_it(store, store_url, s3_endpoint):
    kept = commit_stub(store)
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, store_url, s3_endpoint or ""], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = proc.stdout.strip()
    assert [m.version for m in store.list_versions()] == [kept]
    assert store.fs.exists(store.version_path(dead, "index.faiss"))
    assert gc(store, keep=5).deleted_staging == []  # fresh staging may still be a live build
    report = gc(store, keep=5, stale_after=timedelta(0))
    assert report.deleted_staging == [dead] and report.deleted_versions == []
    assert not store.fs.exists(store.version_path(dead))
    assert [m.version for m in store.list_versions()] == [kept]


def test_gc_keeps_newest_current_previous_pinned_and_used_downloads(store):
    old_date, new_date = "20230101", "20240101"
    v = [commit_stub(store, date=old_date)] + [commit_stub(store, date=new_date) for _ in range(4)]
    for d in (old_date, new_date, "20220101"):
        with atomic_write(store.fs, store.downloads_path("enwiki", d, "dump.xml.bz2")) as f:
            f.write(b"dump")
    store.promote(v[1])
    store.promote(v[2])  # CURRENT = v2, previous = v1
    store.pin(v[0])
    assert store.pinned() == {v[0]}
    report = gc(store, keep=1, stale_after=timedelta(0), dry_run=True)
    assert report.deleted_versions == [v[3]] and sorted(report.kept) == sorted([v[0], v[1], v[2], v[4]])
    assert report.deleted_downloads == ["enwiki/20220101"]
    assert len(store.list_versions()) == 5  # dry run
    gc(store, keep=1, stale_after=timedelta(0))
    assert [m.version for m in store.list_versions()] == [v[0], v[1], v[2], v[4]]
    assert store.fs.exists(store.downloads_path("enwiki", old_date, "dump.xml.bz2"))  # the pinned one uses it
    assert not store.fs.exists(store.downloads_path("enwiki", "20220101"))
    store.unpin(v[0])
    with pytest.raises(NotFound):
        store.unpin(v[0])
    gc(store, keep=1, stale_after=timedelta(0))
    assert [m.version for m in store.list_versions()] == [v[1], v[2], v[4]]
    assert not store.fs.exists(store.downloads_path("enwiki", old_date))
    with pytest.raises(Rejected):
        gc(store, keep=0)


def test_commit_refuses_a_version_whose_staging_gc_removed(store):
    vid = store.begin_version("enwiki", "20240101")
    gc(store, keep=1, stale_after=timedelta(0))
    manifest = Manifest(version=vid, status="ready", source=SourceDump(wiki="enwiki", dump_date="20240101"),
                        encoder=fingerprint_for(4), index=IndexInfo(spec="flat", factory="Flat", dim=4))
    with pytest.raises(NotFound):
        store.commit_version(manifest)
    assert store.list_versions() == []


def test_build_lock_is_exclusive(store):
    with store.build_lock("first"), pytest.raises(Conflict, match="first"), store.build_lock("second"):
        pass
    with store.build_lock("third"):
        pass
