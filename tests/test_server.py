"""The HTTP server over real HTTP on loopback: every endpoint, auth, bad input, swaps and rollbacks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from rag_model.http_limits import ConnectionLimits, server_config
from rag_model.server import create_app
from storage.store import IndexStore
from tests.fixtures.processes import free_port
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version

TOKEN = "let-me-in"


class ServerThread:
    """uvicorn serving an app on a free 127.0.0.1 port in a thread (with `ragindex serve`'s limits, if given)."""

    def __init__(self, app, limits: ConnectionLimits | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = (server_config(app, "127.0.0.1", self.port, limits) if limits
                  else uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def ready_version(client: httpx.Client) -> str | None:
    r = client.get("/readyz")
    return r.json()["version"] if r.status_code == 200 else None


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_question_encoder):
    store = IndexStore(str(tmp_path_factory.mktemp("server") / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    return store, a, b


@pytest.fixture(scope="module")
def client(served) -> Iterator[httpx.Client]:
    store, a, _ = served
    # No --question-encoder: the one the version's encoder pairs with (tiny_dpr's ragindex_pair.json).
    app = create_app(store, admin_token=TOKEN, poll_seconds=0.1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: ready_version(c) == a.version)
        yield c


def test_health_ready_index_and_metrics(client, served):
    store, a, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "version": a.version}
    status = client.get("/v1/index").json()
    assert status["ready"] and status["serving"]["version"] == a.version
    assert status["serving"]["passages"] == len(TOPICS_A) and status["serving"]["wiki"] == "enwiki"
    assert status["store"]["current"]["version"] == a.version
    assert status["last_swap"]["version"] == a.version and status["last_failure"] is None
    assert status["generation_enabled"] is False
    client.post("/v1/retrieve", json={"query": "paris", "k": 2})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'ragindex_requests_total{route="/v1/retrieve",status="200"}' in text
    assert "ragindex_request_seconds_bucket" in text
    assert f'ragindex_serving_version{{version="{a.version}"}} 1.0' in text
    assert "ragindex_index_swaps_total 1.0" in text and "ragindex_index_swap_failures_total 0.0" in text


def test_retrieve(client, served):
    _, a, _ = served
    title, text = TOPICS_A[3]
    r = client.post("/v1/retrieve", json={"query": f"{title} {text}", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == a.version and len(body["hits"]) == 3
    top = body["hits"][0]
    assert top["title"] == title and top["page_id"] in a.page_ids and top["version"] == a.version
    assert top["url"] == f"https://en.wikipedia.org/w/index.php?curid={top['page_id']}&oldid={top['rev_id']}"
    assert client.post("/v1/retrieve", json={"query": "x"}).json()["hits"].__len__() == 5  # default k


def test_concurrent_retrievals_are_batched_and_answered(client, served):
    _, a, _ = served
    results: list[int] = []

    def one(i: int) -> None:
        results.append(client.post("/v1/retrieve", json={"query": f"question {i}", "k": 1 + i % 4}).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16


@pytest.mark.parametrize(
    ("path", "content", "status", "fragment"),
    [
        ("/v1/retrieve", {"query": ""}, 422, "query"),
        ("/v1/retrieve", {"query": "x" * 2001}, 422, "query"),
        ("/v1/retrieve", {"query": "ok", "k": 0}, 422, "k"),
        ("/v1/retrieve", {"query": "ok", "k": 101}, 422, "k"),
        ("/v1/retrieve", {"query": "ok", "k": "many"}, 422, "k"),
        ("/v1/retrieve", {"k": 3}, 422, "query"),
        ("/v1/retrieve", {"query": "ok", "surprise": 1}, 422, "surprise"),
        ("/v1/retrieve", b'{"query": "unterminated', 400, "malformed JSON"),
        ("/v1/retrieve", b"[1, 2]", 422, "body"),
        ("/v1/retrieve", {"query": "x" * 70_000}, 413, "bytes"),
        ("/v1/generate", {"query": "ok", "mode": "beam"}, 422, "mode"),
        ("/v1/generate", {"query": "ok", "n_docs": 0}, 422, "n_docs"),
        ("/v1/generate", {"query": "ok", "n_docs": 21}, 422, "n_docs"),
        ("/v1/generate", {"query": "ok", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ("/v1/generate", {"query": ""}, 422, "query"),
        ("/v1/admin/rollback", {"version": "../etc"}, 400, "invalid version id"),
        ("/v1/admin/rollback", {"version": "enwiki-20000101-20000101t000000z"}, 404, "no version"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(client, path, content, status, fragment):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if isinstance(content, bytes):
        r = client.post(path, content=content, headers={**headers, "Content-Type": "application/json"})
    else:
        r = client.post(path, json=content, headers=headers)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_oversized_chunked_body_is_refused(client):
    def chunks():
        yield b'{"query": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/retrieve", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("path", ["/v1/retrieve", "/v1/generate"])
@pytest.mark.parametrize("query", [" ", "  \t\n  ", "\u00a0\u2003"])
def test_whitespace_only_query_is_422(client, path, query):
    r = client.post(path, json={"query": query})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "invalid query: Value error, query is only whitespace"


def test_index_status_shows_paths_only_to_the_admin(client, served, tmp_path_factory):
    store, a, _ = served
    root = str(tmp_path_factory.getbasetemp())  # the store and the tiny encoders all live below it
    assert store.url.startswith(("file://" + root, root))
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        r = client.get("/v1/index", headers=headers)
        assert r.status_code == 200
        assert root not in r.text and store.url not in r.text
        status = r.json()
        assert status["serving"]["version"] == a.version and status["store"]["current"]["version"] == a.version
    admin = client.get("/v1/index", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert admin["store"]["url"] == store.url


def test_generate_without_a_rag_model_is_503(client):
    r = client.post("/v1/generate", json={"query": "who wrote hamlet"})
    assert r.status_code == 503 and "--rag-model" in r.json()["detail"]


def test_admin_auth(client, served):
    _, a, _ = served
    assert client.post("/v1/admin/reload").status_code == 401
    assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/v1/admin/reload", headers={"Authorization": f"Basic {TOKEN}"}).status_code in (401, 403)
    ok = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["serving"] == a.version


def test_admin_is_disabled_without_a_token(served):
    store, _, _ = served
    with ServerThread(create_app(store, poll_seconds=5)) as server, httpx.Client(base_url=server.url) as c:
        for path in ("/v1/admin/reload", "/v1/admin/rollback"):
            r = c.post(path, headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_openapi_documents_every_endpoint_with_examples(client):
    doc = client.get("/openapi.json").json()
    assert {"/v1/retrieve", "/v1/generate", "/v1/index", "/v1/admin/reload", "/v1/admin/rollback", "/healthz",
            "/readyz", "/metrics"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["RetrieveRequest"]["examples"][0]["query"]
    assert "HTTPBearer" in json.dumps(doc["components"]["securitySchemes"])


def test_promote_rollback_and_refusal_reach_the_server(tmp_path, tiny_question_encoder):
    from tests.fixtures.versions import fingerprint_for

    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000)
    alien_fp = fingerprint_for(tiny_question_encoder.dim, kind="dpr")
    alien = build_version(store, tiny_question_encoder, TOPICS_B, 3000, 7000, fingerprint=alien_fp)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    app = create_app(store, admin_token=TOKEN, poll_seconds=0.1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: ready_version(c) == a.version)
        store.promote(b.version)  # a promote through the store
        wait_for(lambda: c.post("/v1/retrieve", json={"query": "paris"}).json()["version"] == b.version)

        r = c.post("/v1/admin/rollback", json={}, headers=auth)  # rollback through the API
        assert r.status_code == 200, r.text
        assert r.json()["serving"] == a.version and r.json()["current"]["version"] == a.version
        assert r.json()["hold"]["left"] == b.version  # the API's rollback holds what it left, as every rollback
        assert [(h.left, h.actor) for h in store.holds()] == [(b.version, "ragindex-server")]
        assert c.post("/v1/retrieve", json={"query": "paris"}).json()["version"] == a.version

        store.promote(b.version)
        wait_for(lambda: ready_version(c) == b.version)
        store.rollback()  # rollback through the store
        wait_for(lambda: ready_version(c) == a.version)

        r = c.post("/v1/admin/rollback", json={"version": b.version}, headers=auth)
        assert r.status_code == 200 and r.json()["serving"] == b.version
        assert c.post("/v1/admin/rollback", json={"version": b.version}, headers=auth).status_code == 409

        store.promote(alien.version)  # another encoder: refused, the old version keeps serving
        wait_for(lambda: c.get("/v1/index").json()["last_failure"] is not None)
        status = c.get("/v1/index").json()
        assert status["serving"]["version"] == b.version
        assert status["last_failure"]["version"] == alien.version and "fingerprint" in status["last_failure"]["error"]
        hits = c.post("/v1/retrieve", json={"query": "paris", "k": 3}).json()
        assert hits["version"] == b.version and all(h["page_id"] in b.page_ids for h in hits["hits"])
        assert "ragindex_index_swap_failures_total 1.0" in c.get("/metrics").text


def test_generate_over_http(tmp_path, tiny_question_encoder, tiny_rag):
    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    app = create_app(store, rag_model=str(tiny_rag.rag_dir), poll_seconds=0.1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        wait_for(lambda: ready_version(c) == a.version)
        for mode in ("sequence", "token"):
            r = c.post("/v1/generate", json={"query": "where is the eiffel tower", "n_docs": 2, "mode": mode,
                                             "max_new_tokens": 5})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["version"] == a.version and body["mode"] == mode and isinstance(body["answer"], str)
            assert len(body["docs"]) == 2 and all(d["page_id"] in a.page_ids for d in body["docs"])
        too_many = c.post("/v1/generate", json={"query": "x", "n_docs": 20})
        assert too_many.status_code == 400 and "only" in too_many.json()["detail"]
        assert c.get("/v1/index").json()["generation_enabled"] is True


def test_not_ready_until_the_first_version_is_promoted(tmp_path, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    app = create_app(store, poll_seconds=0.1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/retrieve", json={"query": "paris"})
        assert r.status_code == 503 and "no index version" in r.json()["detail"]
        assert c.get("/v1/index").json()["serving"] is None
        a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
        wait_for(lambda: ready_version(c) == a.version)
        assert c.post("/v1/retrieve", json={"query": "paris"}).json()["version"] == a.version
