"""POST /v1/admin/takedown on a real server over loopback HTTP: auth, bad input, the page gone from its
answers at once and from another replica's within one poll, and still gone after a rollback past it."""

from __future__ import annotations

import httpx
import pytest

from rag_model.server import create_app
from storage import denylist
from storage.store import IndexStore
from tasks.takedown import take_down
from tests.fixtures.rag import TOPICS_A, build_version
from tests.test_server import ServerThread, ready_version, wait_for

TOKEN = "takedown-token"
EIFFEL = f"{TOPICS_A[0][0]} {TOPICS_A[0][1]}"


def _pages(client: httpx.Client, query: str = EIFFEL) -> set[int]:
    r = client.post("/v1/retrieve", json={"query": query, "k": len(TOPICS_A)})
    assert r.status_code == 200, r.text
    return {h["page_id"] for h in r.json()["hits"]}


@pytest.fixture
def replicas(tmp_path, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    apps = [create_app(store, admin_token=TOKEN, poll_seconds=0.2, takedown=take_down) for _ in range(2)]
    with ServerThread(apps[0]) as one, ServerThread(apps[1]) as two, \
            httpx.Client(base_url=one.url, timeout=60) as c1, httpx.Client(base_url=two.url, timeout=60) as c2:
        for c in (c1, c2):
            wait_for(lambda c=c: ready_version(c) == a.version)
        yield store, a, c1, c2


def test_api_takedown_takes_the_page_out_of_every_replica(replicas):
    store, a, c1, c2 = replicas
    eiffel = 1000  # TOPICS_A[0]'s page id
    assert eiffel in _pages(c1) and eiffel in _pages(c2)

    body = {"page": "Eiffel Tower", "reason": "court order 12"}
    assert c1.post("/v1/admin/takedown", json=body).status_code == 401
    assert c1.post("/v1/admin/takedown", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    missing = c1.post("/v1/admin/takedown", json={"page": "Atlantis", "reason": "x"},
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and "no page 'Atlantis'" in missing.json()["detail"]
    assert "\n" not in missing.json()["detail"]
    no_reason = c1.post("/v1/admin/takedown", json={"page": "Eiffel Tower"},
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert no_reason.status_code == 422
    assert denylist.denied_page_ids(store, "enwiki") == frozenset() and store.current().version == a.version

    r = c1.post("/v1/admin/takedown", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    result = r.json()
    taken = result["version"]
    assert result["takedown"]["page_id"] == eiffel and result["serving"] == taken
    assert store.current().version == taken and store.manifest(taken).kind == "takedown"
    assert eiffel not in _pages(c1)  # this replica swapped before answering
    wait_for(lambda: eiffel not in _pages(c2), timeout=5)  # the other within a poll or two
    assert _pages(c2) == set(a.page_ids) - {eiffel}
    entry = store.history()[-1]
    assert entry.action == "takedown" and "court order 12" in entry.reason and entry.actor == "ragindex-server"

    # A rollback past the takedown: CURRENT serves the old version again, but not the page.
    store.rollback(a.version, reason="bad takedown version?")
    for c in (c1, c2):
        wait_for(lambda c=c: ready_version(c) == a.version)
        assert eiffel not in _pages(c)
    status = c1.get("/v1/index", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert status["serving"]["version"] == a.version and status["serving"]["passages"] == len(TOPICS_A) - 1

    # Lifted: the version serving it comes back within a poll.
    denylist.lift(store, "enwiki", eiffel, actor="tests", reason="appeal", at=entry.at)
    wait_for(lambda: eiffel in _pages(c1) and eiffel in _pages(c2), timeout=5)


def test_a_server_without_a_takedown_function_says_so(tmp_path, tiny_question_encoder):
    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    with ServerThread(create_app(store, admin_token=TOKEN, poll_seconds=0.2)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        wait_for(lambda: ready_version(c) == a.version)
        r = c.post("/v1/admin/takedown", json={"page": "1000", "reason": "x"},
                   headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 503 and "disabled" in r.json()["detail"]
