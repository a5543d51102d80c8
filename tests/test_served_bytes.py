"""A served version stays the verified bytes for as long as it is served: a store file changed or truncated
in place after the swap changes no answer and cannot crash the server, a changed served copy is found and
replaced by verified bytes, and a reload re-opens and re-verifies (local disk and moto S3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from rag_model.server import create_app
from storage.cache import store_key
from storage.store import IndexStore
from tests.fixtures.processes import free_port, stop_process, wait_until_answering
from tests.fixtures.rag import TOPICS_A, build_version
from tests.test_server import ServerThread, wait_for

TOKEN = "served-bytes-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TITLE, TEXT = TOPICS_A[0]  # "Eiffel Tower"


def rewrite_in_place(path: str, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (same length) in a local file in place: same size, inode and mtime after."""
    st = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    assert old in data and len(old) == len(new)
    os.chmod(path, 0o644)  # a private copy is read-only; its owner (or root) can still write it
    with open(path, "r+b") as f:
        f.write(data.replace(old, new))
    os.chmod(path, st.st_mode & 0o777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (st.st_size, st.st_ino, st.st_mtime_ns)


def change_store_file(store: IndexStore, version: str, rel: str, old: bytes, new: bytes) -> None:
    path = store.version_path(version, rel)
    if store.s3_endpoint_url:  # an object has no "in place": it is rewritten with the same length
        data = store.fs.cat_file(path)
        store.fs.pipe_file(path, data.replace(old, new))
    else:
        rewrite_in_place(path, old, new)


def top_hit(c: httpx.Client) -> dict:
    r = c.post("/v1/retrieve", json={"query": f"{TITLE} {TEXT}", "k": 1})
    assert r.status_code == 200, r.text
    return r.json()["hits"][0]


def served_app(store: IndexStore, tiny_dpr, cache_dir: str, **kwargs):
    return create_app(store, question_encoder=str(tiny_dpr.question_dir), question_encoder_kind="dpr",
                      admin_token=TOKEN, poll_seconds=3600, cache_dir=cache_dir, **kwargs)


def test_a_store_file_changed_in_place_after_the_swap_is_not_served(store, tiny_question_encoder, tiny_dpr,
                                                                     tmp_path):
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    app = served_app(store, tiny_dpr, str(tmp_path / "cache"))
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        before = top_hit(c)
        assert before["title"] == TITLE
        change_store_file(store, a.version, "passages.arrow", b"Eiffel", b"Xiffel")
        assert top_hit(c) == before  # the verified bytes, not the store's changed ones
        reload = c.post("/v1/admin/reload", headers=AUTH).json()
        assert reload["serving"] == a.version
        if not store.s3_endpoint_url:  # a reload re-verifies the store's file and reports the change
            assert reload["swap"]["ok"] is False and "passages.arrow" in reload["swap"]["error"]
            assert "passages.arrow" in c.get("/v1/index").json()["last_error"]
        assert top_hit(c) == before
        # What is served still matches its manifest, so the server stays ready while it says what changed.
        assert c.get("/readyz").json() == {"ready": True, "version": a.version}


def test_a_served_copy_changed_in_place_is_found_and_served_verified_again(store, tiny_question_encoder, tiny_dpr,
                                                                           tmp_path):
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    cache = tmp_path / "cache"
    app = served_app(store, tiny_dpr, str(cache), reverify_stat_seconds=0.1, reverify_seconds=0)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        before = top_hit(c)
        sha = store.manifest(a.version).files["passages.arrow"]
        copy = cache / store_key(store.url) / "blobs" / sha / "passages.arrow"
        assert copy.is_file() and not copy.stat().st_mode & 0o222  # private and read-only
        served_inode = copy.stat().st_ino
        rewrite_in_place(str(copy), b"Eiffel", b"Xiffel")
        # Seen by its ctime within a stat period; the version is re-opened from verified bytes.
        wait_for(lambda: os.path.exists(copy) and copy.stat().st_ino != served_inode, timeout=20)
        assert b"Xiffel" not in copy.read_bytes()
        # The copy is fetched again first, then the version re-opened from it and swapped in.
        wait_for(lambda: top_hit(c) == before, timeout=20)
        assert c.get("/readyz").json() == {"ready": True, "version": a.version}


def test_a_rehash_pass_finds_a_change_no_stamp_shows(tmp_path, tiny_question_encoder, tiny_dpr):
    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    cache = tmp_path / "cache"
    app = served_app(store, tiny_dpr, str(cache), reverify_stat_seconds=3600, reverify_seconds=3600)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        checker = app.state.serving.checker
        index = app.state.serving.retriever.current
        sha = store.manifest(a.version).files["index.faiss"]
        copy = cache / store_key(store.url) / "blobs" / sha / "index.faiss"
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0x01
        os.chmod(copy, 0o644)
        copy.write_bytes(bytes(data))
        # Bit rot moves no stamp: pretend the copy's stamps are unchanged, only a re-hash can tell.
        from storage.cache import file_stamp
        for f in index.served_files:
            object.__setattr__(f, "stamp", file_stamp(f.path))
        assert checker.check_stamps() is None and app.state.serving.retriever.current is index
        record = checker.rehash_pass()
        assert record.mismatched == [f"version {a.version}: index.faiss"] and record.bytes > 0
        assert app.state.serving.retriever.current is not index  # re-opened from verified bytes
        assert top_hit(c)["title"] == TITLE
        status = c.get("/v1/index", headers=AUTH).json()["served_bytes"]
        assert status["problem"] is None and status["last_pass"]["mismatched"]


def test_truncating_served_store_files_does_not_kill_the_server(tmp_path, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    port = free_port()
    env = {**os.environ, "RAGINDEX_ADMIN_TOKEN": TOKEN, "RAGINDEX_CACHE_DIR": str(tmp_path / "cache"),
           "RAGINDEX_STORE_URL": str(tmp_path / "unused")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--store", store.url, "--host", "127.0.0.1", "--port", str(port),
         "--poll-seconds", "0.2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    answers, reload = [], None
    try:
        wait_until_answering(url + "/readyz", proc, 60, "ragindex serve")
        with httpx.Client(base_url=url, timeout=30) as c:
            before = top_hit(c)
            for rel in ("index.faiss", "passages.arrow"):
                os.truncate(store.version_path(a.version, rel), 0)  # in place: same inode, every page gone
            try:
                answers = [top_hit(c) for _ in range(5)]
                reload = c.post("/v1/admin/reload", headers=AUTH).json()
                answers.append(top_hit(c))
            except httpx.HTTPError:
                pass  # the process is looked at below
        code = proc.poll()
    finally:
        stop_process(proc, timeout=20)
    assert code is None, f"the server died ({'SIGBUS' if code == -signal.SIGBUS else code}) after the truncation"
    assert answers == [before] * 6
    assert reload["serving"] == a.version and reload["swap"]["ok"] is False  # the store's files are reported


@pytest.mark.parametrize("rehash", [False, True])
def test_a_local_copy_is_made_once_and_refused_when_the_store_file_changed(tmp_path, tiny_question_encoder,
                                                                          rehash):
    from rag_model.index import VersionIndex
    from storage.cache import FileCache
    from storage.errors import Corrupt

    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    cache = FileCache.for_store(store.url, base=str(tmp_path / "cache"))
    first = VersionIndex.open(store, a.version, cache=cache)
    assert all(f.path.startswith(cache.root) for f in first.served_files)  # never the store's own files
    again = VersionIndex.open(store, a.version, cache=cache, rehash=rehash)
    assert [f.stamp["inode"] for f in again.served_files] == [f.stamp["inode"] for f in first.served_files]
    path = store.version_path(a.version, "passages.arrow")
    rewrite_in_place(path, b"Eiffel", b"Xiffel")
    with pytest.raises(Corrupt, match="passages.arrow"):
        VersionIndex.open(store, a.version, cache=cache, rehash=rehash)
