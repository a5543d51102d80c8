"""Every move of CURRENT is safe and means what it says, on local disk and on S3 (a moto server).

No-op promotes, rollback direction, gc racing a promote, what gc keeps and collects, history
writes that fail after the swap, and one corrupt manifest among good ones.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import timedelta

import pytest

from cli.store import versions_report
from storage.errors import Conflict, CorruptManifest, NotFound
from storage.fs import atomic_write
from storage.retention import gc
from tests.test_store import commit_stub


def test_promoting_the_current_version_again_changes_nothing(store):
    a, b = commit_stub(store), commit_stub(store)
    store.promote(a)
    store.promote(b)
    again = store.promote(b)
    assert (again.version, again.previous, again.generation) == (b, a, 2)
    assert store.current().previous == a and len(store.history()) == 2
    assert not again.moved
    assert gc(store, keep=1, stale_after=timedelta(0)).deleted_versions == []  # a is still previous
    assert store.rollback().version == a


def test_rollback_goes_back_one_version_each_time_never_forward(store):
    a, b, c = commit_stub(store), commit_stub(store), commit_stub(store)
    for v in (a, b, c):
        store.promote(v)
    assert store.rollback().version == b
    second = store.rollback()
    assert (second.version, second.previous) == (a, b)  # not forward to c, the version just left
    with pytest.raises(NotFound, match="no previous"):
        store.rollback()
    store.promote(c)  # CURRENT c, previous a: the newest ready version older than c is b
    assert store.rollback().version == b


def test_rollback_skips_rejected_versions(store):
    a = commit_stub(store)
    commit_stub(store, status="rejected")
    c = commit_stub(store)
    store.promote(a)
    store.promote(c)
    assert store.rollback().version == a


def test_rejected_versions_do_not_count_toward_keep(store):
    a, b = commit_stub(store), commit_stub(store)
    r1, r2 = commit_stub(store, status="rejected"), commit_stub(store, status="rejected")
    report = gc(store, keep=2, stale_after=timedelta(0))
    assert sorted(report.deleted_versions) == sorted([r1, r2])
    assert [m.version for m in store.list_versions()] == [a, b]


def test_gc_never_deletes_a_version_a_concurrent_promote_names(store):
    """gc deletes old versions one by one while a promote picks the last of them: either the promote
    loses (NotFound, the version was already gone) or gc keeps the version; never a dangling CURRENT."""
    versions = [commit_stub(store) for _ in range(30)]
    store.promote(versions[-1])
    first, target = versions[0], versions[-3]  # gc deletes `first` early and `target` late
    outcome: list[object] = []

    def promote_when_gc_has_started() -> None:
        deadline = time.monotonic() + 60
        while store.has_version(first) and time.monotonic() < deadline:
            pass
        try:
            outcome.append(store.promote(target))
        except NotFound as exc:
            outcome.append(exc)

    racer = threading.Thread(target=promote_when_gc_has_started)
    racer.start()
    report = gc(store, keep=1, stale_after=timedelta(0))
    racer.join(60)
    current = store.current()
    assert store.manifest(current.version).status == "ready", (outcome, report.deleted_versions)
    assert store.fs.exists(store.version_path(current.version, "data.bin"))
    assert current.version not in report.deleted_versions


def test_history_write_failing_after_the_swap_says_current_moved_and_is_repaired(store):
    a, b, c = commit_stub(store), commit_stub(store), commit_stub(store)
    store.promote(a)
    blocker = store.path("history", "00000002.json")
    with atomic_write(store.fs, blocker) as f:  # the history write of generation 2 will fail
        f.write(b"not a history entry")
    moved = store.promote(b)  # must not raise: CURRENT did move
    assert store.current().version == b == moved.version and not moved.history_written
    store.fs.rm_file(blocker)  # whatever broke the write is gone
    store.promote(c)
    history = store.history()
    assert [(h.generation, h.from_version, h.to_version) for h in history] == [(1, None, a), (2, a, b), (3, b, c)]
    assert "reconstructed" in history[1].reason


def test_one_corrupt_manifest_blocks_nothing_else(store):
    a, b, c = commit_stub(store), commit_stub(store), commit_stub(store)
    store.promote(a)
    store.promote(c)
    with atomic_write(store.fs, store.version_path(b, "manifest.json")) as f:
        f.write(b'{"version": "truncated')
    assert [m.version for m in store.list_versions()] == [a, c]
    report = versions_report(store)
    row = next(r for r in report["versions"] if r["version"] == b)
    assert row["status"] == "corrupt" and row["path"].endswith(f"{b}/manifest.json") and "corrupt" in row["reason"]
    json.dumps(report)
    with pytest.raises(CorruptManifest, match=f"{b}.*manifest.json"):
        store.promote(b)
    assert store.rollback().version == a  # past the corrupt one
    report = gc(store, keep=1, stale_after=timedelta(0))
    assert report.deleted_corrupt == [b] and not store.fs.exists(store.version_path(b))
    assert {m.version for m in store.list_versions()} == {a, c}


def test_gc_collects_task_results_that_only_dead_versions_used(store):
    dead, keep = commit_stub(store), commit_stub(store)
    store.promote(keep)
    results = {
        "dead-json": json.dumps({"result": {"work_dir": store.version_url(dead, "_work")}}).encode(),
        "dead-pickle": json.dumps({"result": base64.b64encode(
            b"\x80\x04\x95" + store.version_url(dead, "embeddings/part-00000.npy").encode()).decode()}).encode(),
        "kept": json.dumps({"result": {"out": store.version_url(keep, "embeddings")}}).encode(),
        "no-version": json.dumps({"result": {"n": 1}}).encode(),
    }
    for name, data in results.items():
        with atomic_write(store.fs, store.path("prefect-results", name)) as f:
            f.write(data)
    report = gc(store, keep=1, stale_after=timedelta(0))
    assert report.deleted_versions == [dead]
    assert sorted(report.deleted_results) == ["dead-json", "dead-pickle"]
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path("prefect-results"), detail=False)) == [
        "kept", "no-version"]


def test_explicit_rollback_to_current_is_still_refused(store):
    a = commit_stub(store)
    store.promote(a)
    with pytest.raises(Exception, match="already CURRENT"):
        store.rollback(a)
    with pytest.raises(Conflict):
        store.promote(a, expected_generation=0)


def test_the_api_answers_409_for_a_corrupt_manifest(tmp_path, tiny_question_encoder):
    import httpx

    from rag_model.server import create_app
    from storage.store import IndexStore
    from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version
    from tests.test_server import TOKEN, ServerThread, ready_version, wait_for

    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    with atomic_write(store.fs, store.version_path(b.version, "manifest.json")) as f:
        f.write(b"{}")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ServerThread(create_app(store, admin_token=TOKEN, poll_seconds=0.1)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: ready_version(c) == a.version)
        r = c.post("/v1/admin/rollback", json={"version": b.version}, headers=auth)
        assert r.status_code == 409 and "corrupt manifest" in r.json()["detail"], r.text
        assert c.get("/v1/index").status_code == 200
        assert c.post("/v1/retrieve", json={"query": "paris"}).json()["version"] == a.version


def test_cli_lists_a_corrupt_manifest_and_gc_removes_it(tmp_path, monkeypatch, capsys):
    from flows.settings import load_settings
    from storage.store import IndexStore
    from tests.test_cli_store import run

    url = str(tmp_path / "store")
    monkeypatch.setenv("RAGINDEX_STORE_URL", url)
    monkeypatch.setenv("COLUMNS", "250")
    load_settings.cache_clear()
    store = IndexStore(url)
    a, b = commit_stub(store), commit_stub(store)
    store.promote(b)
    with atomic_write(store.fs, store.version_path(a, "manifest.json")) as f:
        f.write(b"[1, 2")
    try:
        code, out, err = run(["versions"], capsys)
        assert code == 0 and a in out and "corrupt" in out and "manifest.json" in out, out + err
        code, out, _ = run(["versions", "--json"], capsys)
        rows = {r["version"]: r for r in json.loads(out)["versions"]}
        assert code == 0 and rows[a]["status"] == "corrupt" and rows[b]["current"]
        code, out, _ = run(["gc", "--keep", "1", "--stale-hours", "0"], capsys)
        assert code == 0 and f"deleted corrupt version {a}" in out
        assert [m.version for m in store.list_versions()] == [b] and not store.fs.exists(store.version_path(a))
    finally:
        load_settings.cache_clear()
