"""Slow and greedy clients over real sockets: read deadlines cut them off, the connection cap bounds them."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from rag_model.http_limits import ConnectionLimits
from rag_model.server import create_app
from storage.store import IndexStore
from tests.fixtures.rag import TOPICS_A, build_version
from tests.test_server import ServerThread, ready_version, wait_for

HEAD = b"POST /v1/retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def seconds_until_closed(sock: socket.socket, first: bytes, trickle: bytes, give_up_s: float) -> float | None:
    """Send `first`, then one byte of `trickle` every 0.2 s; how long until the server closed the connection."""
    start = time.monotonic()
    sock.sendall(first)
    sent = 0
    while time.monotonic() - start < give_up_s:
        readable, _, _ = select.select([sock], [], [], 0.2)
        try:
            if readable and sock.recv(4096) == b"":
                return time.monotonic() - start
            if trickle:
                sock.send(trickle[sent % len(trickle):][:1])
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
    return None


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_question_encoder) -> Iterator[ServerThread]:
    store = IndexStore(str(tmp_path_factory.mktemp("limits") / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000, promote=True)
    app = create_app(store, poll_seconds=0.5)
    limits = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=5, max_connections=4)
    with ServerThread(app, limits) as server:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            wait_for(lambda: ready_version(c) == a.version)
        yield server


def test_slow_heads_and_bodies_are_cut_off_while_others_are_served(limited):
    body = b'{"query": "paris", "k": 1}'
    slow = {
        "idle": (b"", b""),  # connects and never sends a byte
        "slow head": (HEAD, b"X-Slow: " + b"a" * 200),
        "slow body": (HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body[:1], body[1:]),
    }
    closed_after: dict[str, float | None] = {}

    def hold(name: str, first: bytes, trickle: bytes) -> None:
        with socket.create_connection(("127.0.0.1", limited.port)) as sock:
            closed_after[name] = seconds_until_closed(sock, first, trickle, give_up_s=8)

    threads = [threading.Thread(target=hold, args=(name, *parts)) for name, parts in slow.items()]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all three are connected and dribbling
    # The cap is 4 connections: with the three slow clients in, a fourth is told 503 at once, not queued.
    assert httpx.post(limited.url + "/v1/retrieve", json={"query": "paris"}, timeout=5).status_code == 503
    for t in threads:
        t.join(15)
    for name, seconds in closed_after.items():
        assert seconds is not None and 0.8 <= seconds < 3.0, f"{name}: closed after {seconds}"
    # Cut off, they no longer hold their slots: everyone else is served again.
    with httpx.Client(base_url=limited.url, timeout=10) as c:
        for _ in range(3):
            r = c.post("/v1/retrieve", json={"query": "paris", "k": 1})
            assert r.status_code == 200, r.text


def test_a_client_that_sends_in_time_is_not_cut_off(limited):
    """Keep-alive and a request split over packets within the deadline are fine."""
    body = b'{"query": "paris", "k": 1}'
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        for _ in range(2):  # two requests on one connection, each arriving in three pieces
            sock.sendall(HEAD)
            time.sleep(0.3)
            sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
            time.sleep(0.3)
            sock.sendall(body[5:])
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, f"closed mid-answer: {reply!r}"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            time.sleep(1.5)  # idle longer than the head deadline, shorter than keep-alive
