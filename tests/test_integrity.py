"""A version is used only if its bytes are the bytes its manifest names: promote, rollback, query,
a serving process and embedding reuse all refuse (or re-encode) an altered, truncated or missing file,
on local disk and on the moto S3 server."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import numpy as np
import pytest

from rag_model.query import query_store
from rag_model.server import create_app
from storage.errors import RagindexError, Rejected
from storage.location import Location
from storage.store import IndexStore
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version
from tests.test_server import ServerThread, wait_for

TOKEN = "verify-token"
DAMAGES = ("flip", "truncate", "missing")


def damage(store: IndexStore, version: str, rel: str, how: str) -> bytes:
    """Alter one file of a version in the store; returns its good bytes."""
    path = store.version_path(version, rel)
    good = store.fs.cat_file(path)
    if how == "missing":
        store.fs.rm_file(path)
    elif how == "truncate":
        store.fs.pipe_file(path, good[: len(good) - 9])
    else:
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x01  # one bit, in the middle: still parses, silently different
        store.fs.pipe_file(path, bytes(flipped))
    return good


def assert_refused(excinfo: pytest.ExceptionInfo, rel: str) -> None:
    message = str(excinfo.value)
    assert type(excinfo.value).__name__ == "Corrupt", message
    assert rel in message and "\n" not in message.strip()


# -- promote and rollback ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", ["index.faiss", "passages/part-00000.parquet", "passages.arrow"])
def test_promote_and_rollback_refuse_a_damaged_version(store, tiny_question_encoder, rel, how):
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000, promote=True)
    damage(store, a.version, rel, how)
    with pytest.raises(Rejected) as refused:
        store.rollback()
    assert_refused(refused, rel)
    with pytest.raises(Rejected) as refused:
        store.promote(a.version)
    assert_refused(refused, rel)
    pointer = store.current()
    assert (pointer.version, pointer.previous, pointer.generation) == (b.version, a.version, 2)


# -- ragindex query ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", ["index.faiss", "passages.arrow"])
def test_query_refuses_a_damaged_version(store, tiny_question_encoder, tiny_dpr, tmp_path, rel, how):
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    ask = dict(question_encoder=str(tiny_dpr.question_dir), question_encoder_kind="dpr")
    title, text = TOPICS_A[2]
    assert query_store(store, f"{title} {text}", 2, cache_dir=str(tmp_path / "c1"), **ask).hits[0].title == title
    damage(store, a.version, rel, how)
    if store.s3_endpoint_url:
        # The verified copy in the cache is the manifest's bytes: it still answers, without the store.
        assert query_store(store, title, 2, cache_dir=str(tmp_path / "c1"), **ask).version == a.version
    with pytest.raises(RagindexError) as refused:
        query_store(store, title, 2, cache_dir=str(tmp_path / "c2"), **ask)
    assert_refused(refused, rel)


def test_query_cli_refuses_in_one_line(tmp_path, tiny_question_encoder, tiny_dpr, capsys, monkeypatch):
    from cli.main import main

    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    damage(store, a.version, "index.faiss", "flip")
    monkeypatch.setenv("RAGINDEX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exited:
        main(["query", "paris", "--store", store.url, "--question-encoder", str(tiny_dpr.question_dir),
              "--question-encoder-kind", "dpr", "--json"])
    err = capsys.readouterr()
    assert exited.value.code not in (0, None) and err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and "index.faiss" in lines[0] and "Traceback" not in err.err


# -- a serving process ----------------------------------------------------------------------------


@pytest.mark.parametrize(("rel", "how"), [("index.faiss", "flip"), ("passages.arrow", "truncate"),
                                          ("index.faiss", "missing")])
def test_server_keeps_serving_and_reports_a_refused_version(store, tiny_question_encoder, tiny_dpr, tmp_path,
                                                            rel, how):
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    grace = 1.5
    # A long poll: the test decides when the server looks at CURRENT (POST /v1/admin/reload).
    app = create_app(store, question_encoder=str(tiny_dpr.question_dir), question_encoder_kind="dpr",
                     admin_token=TOKEN, poll_seconds=3600, cache_dir=str(tmp_path / "cache"),
                     ready_grace_seconds=grace)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        store.promote(b.version)  # verified here; damaged only afterwards, as a careless operator would
        good = damage(store, b.version, rel, how)
        swap = c.post("/v1/admin/reload", headers=auth).json()["swap"]
        assert swap["ok"] is False and rel in swap["error"]
        title, text = TOPICS_A[0]
        answer = c.post("/v1/retrieve", json={"query": f"{title} {text}", "k": 2}).json()
        assert answer["version"] == a.version and answer["hits"][0]["page_id"] in a.page_ids
        status = c.get("/v1/index").json()
        assert status["serving"]["version"] == a.version
        assert b.version in status["last_error"] and rel in status["last_error"]
        assert "ragindex_index_verification_failures_total 1.0" in c.get("/metrics").text
        assert c.get("/readyz").status_code == 200  # within the grace period
        time.sleep(grace + 0.2)
        not_ready = c.get("/readyz")
        assert not_ready.status_code == 503
        body = not_ready.json()
        assert body["ready"] is False and body["version"] == a.version and body["current"] == b.version
        assert rel in body["error"]
        assert c.post("/v1/retrieve", json={"query": title, "k": 1}).json()["version"] == a.version
        store.fs.pipe_file(store.version_path(b.version, rel), good)  # repaired: the next reload serves it
        assert c.post("/v1/admin/reload", headers=auth).json()["serving"] == b.version
        assert c.get("/readyz").json() == {"ready": True, "version": b.version}


# -- embedding reuse -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local-plain-root", "s3-version-with-manifest"])
@pytest.mark.parametrize("rel", ["embeddings/part-00000.npy", "passages/part-00000.parquet"])
def test_reuse_from_a_damaged_earlier_version_encodes_again(tmp_path, tiny_dpr, where, rel, request):
    from rag_model.encoders import EncoderSpec
    from storage.fs import resolve
    from tasks.embed import embed_passages
    from tests.fixtures.models import write_passages
    from tests.test_embed import Counter, load_vectors, make_articles

    spec = EncoderSpec(str(tiny_dpr.ctx_dir))
    articles = make_articles(12, seed=5)
    v1 = tmp_path / "v1"
    rows1 = write_passages(v1 / "passages", articles)
    embed_passages(Location(v1 / "passages"), Location(v1 / "embeddings"), spec, progress=False, precision="fp32")
    good_vectors = load_vectors(v1 / "embeddings")
    source, endpoint = str(v1), None
    if where.startswith("s3"):
        from tests.fixtures.s3 import make_bucket

        endpoint = request.getfixturevalue("moto_server")
        fs, root = resolve(f"s3://{make_bucket(endpoint)}/versions/v1", endpoint)
        fs.put(str(v1) + "/", root + "/", recursive=True)
        files = {p.relative_to(v1).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in v1.rglob("*") if p.is_file()}
        fs.pipe_file(root + "/manifest.json", json.dumps({"files": files}).encode())
        source = f"s3://{root}"
    fs, root = resolve(source, endpoint)
    path = f"{root}/{rel}"
    if rel.endswith(".npy"):
        bad = bytearray(fs.cat_file(path))
        bad[-3] ^= 0x40  # a bit of the last vector: still a valid array, silently wrong
        bad = bytes(bad)
    else:  # a valid parquet file with the same hashes in another order: every reused row would be wrong
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        out = io.BytesIO()
        pq.write_table(table.take(list(range(table.num_rows))[::-1]), out, compression="zstd")
        bad = out.getvalue()
    fs.pipe_file(path, bad)

    rows2 = write_passages(tmp_path / "v2" / "passages", articles)  # the same passages again
    shard0 = json.loads((v1 / "passages" / "passages.json").read_text())["shards"][0]["rows"]
    counter = Counter()
    summary = embed_passages(Location(tmp_path / "v2" / "passages"), Location(tmp_path / "v2" / "embeddings"), spec,
                             reuse_from=[Location(source, endpoint)], progress=False,
                             encoder_calls=counter, precision="fp32")
    assert counter.passages == summary["encoded"] == shard0  # only the damaged shard's rows, encoded again
    assert summary["reused"] == len(rows2) - shard0
    np.testing.assert_allclose(load_vectors(tmp_path / "v2" / "embeddings"), good_vectors, rtol=1e-5, atol=1e-5)
    assert len(rows1) == len(rows2)
