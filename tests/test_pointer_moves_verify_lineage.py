"""A move of CURRENT (promote, rollback; CLI, API, store) verifies the whole lineage the target serves, as
serving does when it opens it: a delta whose ancestor's file is corrupt, edited or gone, or whose ancestor's
manifest was edited, is refused in one line and CURRENT stays where it was. On local disk and on moto S3."""

from __future__ import annotations

import httpx
import pytest

import storage.cache
import storage.verify
from rag_model.server import create_app
from storage.errors import Corrupt
from storage.store import IndexStore
from tests.fixtures.versions import clustered_vectors, commit_delta, fingerprint_for, make_version, random_passages
from tests.test_cli_ops import clean_settings, one_error_line  # noqa: F401 (clean_settings: a fixture)
from tests.test_cli_store import run
from tests.test_server import TOKEN, ServerThread

DIM = 8


def _rewrite(store: IndexStore, path: str, change) -> None:
    with store.fs.open(path, "rb") as f:
        data = f.read()
    with store.fs.open(path, "wb") as f:
        f.write(change(data))


def _flip_last_byte(data: bytes) -> bytes:  # same size: only a hash notices
    return data[:-1] + bytes([data[-1] ^ 0xFF])


DAMAGE = {
    "corrupt": lambda store, v: _rewrite(store, store.version_path(v, "index.faiss"), _flip_last_byte),
    "edit": lambda store, v: _rewrite(store, store.version_path(v, "passages.arrow"), lambda d: d + b"planted"),
    "delete": lambda store, v: store.fs.rm_file(store.version_path(v, "embeddings", "part-00000.npy")),
    "manifest": lambda store, v: _rewrite(store, store.version_path(v, "manifest.json"), lambda d: d + b"\n"),
}


@pytest.fixture
def broken_delta(store: IndexStore, request) -> tuple[IndexStore, str, str, str]:
    """CURRENT at full version `b`; `delta` shares the rows of full version `a`, whose `request.param` damage
    it cannot see in its own files. Returns (store, a, b, delta)."""
    fp = fingerprint_for(DIM)
    a = make_version(store, random_passages(40, seed=1), clustered_vectors(40, DIM, seed=1), fp)
    b = make_version(store, random_passages(50, seed=2), clustered_vectors(50, DIM, seed=2), fp, promote=True)
    delta = commit_delta(store, a, ["20240102"])
    DAMAGE[request.param](store, a)
    return store, a, b, delta


def _unchanged(store: IndexStore, b: str) -> None:
    current = store.current()
    assert (current.version, current.generation) == (b, 1)
    assert [h.to_version for h in store.history()] == [b]
    assert store.holds() == []


@pytest.mark.parametrize("broken_delta", sorted(DAMAGE), indirect=True)
def test_the_store_refuses_to_move_current_onto_a_broken_lineage(broken_delta):
    store, a, b, delta = broken_delta
    for move in (lambda: store.promote(delta), lambda: store.rollback(delta)):
        with pytest.raises(Corrupt, match=f"{a}"):
            move()
        _unchanged(store, b)


@pytest.mark.parametrize("broken_delta", sorted(DAMAGE), indirect=True)
def test_cli_promote_and_rollback_refuse_in_one_line(broken_delta, clean_settings, s3_endpoint, capsys):  # noqa: F811
    store, a, b, delta = broken_delta
    if s3_endpoint:
        clean_settings.setenv("RAGINDEX_S3_ENDPOINT_URL", s3_endpoint)
    for command in ("promote", "rollback"):
        code, out, err = run([command, delta, "--store", store.url], capsys)
        assert code != 0, out
        line = one_error_line(err)
        assert f"segment {a}" in line, line
        _unchanged(store, b)


@pytest.mark.parametrize("broken_delta", ["corrupt", "manifest"], indirect=True)
def test_api_rollback_refuses_with_a_4xx(broken_delta):
    store, a, b, delta = broken_delta
    app = create_app(IndexStore(store.url, s3_endpoint_url=store.s3_endpoint_url), admin_token=TOKEN,
                     poll_seconds=60)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/admin/rollback", json={"version": delta}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409, r.text
    assert f"segment {a}" in r.json()["detail"] and "\n" not in r.json()["detail"]
    _unchanged(store, b)


def test_an_intact_lineage_still_moves(store: IndexStore):
    fp = fingerprint_for(DIM)
    a = make_version(store, random_passages(40, seed=1), clustered_vectors(40, DIM, seed=1), fp, promote=True)
    delta = commit_delta(store, a, ["20240102"])
    assert store.promote(delta).version == delta
    assert store.rollback().version == a
    assert store.rollback(delta).version == delta


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_move_hashes_only_what_changed_since_it_was_last_verified(store: IndexStore, damage, monkeypatch):
    """The ancestors' unchanged files are not read again on every move (a live micro-delta is promoted every
    few minutes over gigabytes of them), yet a change made after they were verified is still refused."""
    hashed: list[str] = []
    local_hash, remote_hash = storage.cache.sha256_of_path, storage.verify.file_digest
    monkeypatch.setattr(storage.cache, "sha256_of_path", lambda path: hashed.append(path) or local_hash(path))
    monkeypatch.setattr(storage.verify, "file_digest", lambda fs, path: hashed.append(path) or remote_hash(fs, path))
    fp = fingerprint_for(DIM)
    a = make_version(store, random_passages(40, seed=1), clustered_vectors(40, DIM, seed=1), fp)
    delta = commit_delta(store, a, ["20240102"])
    hashed.clear()
    assert store.promote(delta).version == delta
    assert {p for p in hashed if f"/{a}/" in p}, "the first move verifies the ancestor's files"
    hashed.clear()
    assert store.promote(a).version == a
    assert store.rollback(delta).version == delta
    assert not [p for p in hashed if f"/{a}/" in p], hashed

    assert store.rollback().version == a
    DAMAGE[damage](store, a)
    with pytest.raises(Corrupt, match=a):
        store.rollback(delta)
    assert store.current().version == a
