"""The build lock is a lease (heartbeat + expiry, no host names), and a store whose S3 endpoint
ignores conditional writes is refused. Local disk and the moto S3 server; real processes."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from storage.errors import Conflict, Rejected
from storage.fs import atomic_write
from storage.lock import Lease
from storage.store import IndexStore
from tests.fixtures.s3 import make_bucket
from tests.test_store import commit_stub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    from storage.store import IndexStore
    store = IndexStore(sys.argv[1], s3_endpoint_url=sys.argv[2] or None)
    ttl = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    with store.build_lock("sleeper", ttl=timedelta(seconds=ttl)) as lease:
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
        print("lost" if lease.lost else "kept", flush=True)
""")


def _holder(store_url: str, endpoint: str | None, seconds: float, ttl: float = 1.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store_url, endpoint or "", str(seconds), str(ttl)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_keeps_its_lock_past_the_ttl(store, store_url, s3_endpoint):
    proc = _holder(store_url, s3_endpoint, 4)
    try:
        time.sleep(2.5)  # more than twice the ttl: only the heartbeat keeps it
        with pytest.raises(Conflict, match="sleeper"), store.build_lock("second"):
            pass
        assert proc.stdout.readline().strip() == "kept"
    finally:
        proc.wait(30)
    with store.build_lock("third"):  # released on exit
        pass


def test_a_holder_killed_on_this_machine_frees_the_lock_at_once(store, store_url, s3_endpoint):
    proc = _holder(store_url, s3_endpoint, 60, ttl=600)
    # Ten-minute leases: only the dead-process shortcut can free it within this test.
    with pytest.raises(Conflict, match="sleeper"), store.build_lock("early", ttl=timedelta(minutes=10)):
        pass
    proc.kill()
    proc.wait(30)  # reaped: the pid is gone, as after any crash
    with store.build_lock("rerun", ttl=timedelta(minutes=10)) as mine:
        raw = json.loads(store.fs.cat_file(store.path("locks", "build.json")))
        assert raw["token"] == mine.token and raw["owner"] == "rerun"


def test_a_stalled_holder_loses_the_lock_and_its_release_leaves_the_new_one(store, store_url, s3_endpoint):
    proc = _holder(store_url, s3_endpoint, 4)
    os.kill(proc.pid, signal.SIGSTOP)  # a hung build: alive, same host, but not renewing
    try:
        time.sleep(1.6)
        with store.build_lock("second", ttl=timedelta(seconds=30)) as mine:
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.stdout.readline().strip() == "lost"
            proc.wait(30)
            raw = json.loads(store.fs.cat_file(store.path("locks", "build.json")))
            assert raw["token"] == mine.token and raw["owner"] == "second"  # its release did not delete ours
        assert not store.fs.exists(store.path("locks", "build.json"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(30)


def test_a_malformed_lock_is_reported_in_one_line_and_broken(store, caplog):
    with atomic_write(store.fs, store.path("locks", "build.json")) as f:
        f.write(b"{not json")
    with caplog.at_level(logging.WARNING), store.build_lock("after"):
        pass
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and store.url in lines[0]
    assert not store.fs.exists(store.path("locks", "build.json"))


def _break(url: str, endpoint: str | None, barrier, results) -> None:
    store = IndexStore(url, s3_endpoint_url=endpoint)
    lease = Lease(store.fs, store.path("locks", "build.json"), f"breaker-{os.getpid()}", ttl=timedelta(seconds=30))
    barrier.wait()
    try:
        lease._try_acquire()  # no heartbeat thread across fork; the race is the take-over itself
        results.put("won")
    except Conflict:
        results.put("conflict")


def test_breaking_a_stale_lock_is_a_compare_and_swap(store, store_url, s3_endpoint):
    expired = {"owner": "dead build", "token": "x", "since": "2020-01-01T00:00:00+00:00",
               "expires_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat()}
    ctx = multiprocessing.get_context("fork")
    for _ in range(3):
        with atomic_write(store.fs, store.path("locks", "build.json")) as f:
            f.write(json.dumps(expired).encode())
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_break, args=(store_url, s3_endpoint, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        outcome = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        assert outcome == ["conflict", "won"]


# -- an S3-compatible endpoint that ignores If-Match / If-None-Match -------------------------------

_CONDITIONS = {"if-match", "if-none-match"}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "host"}


def _proxy_handler(upstream: str) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _CONDITIONS | _HOP}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            conn.request(self.command, self.path, body=body, headers={**headers, "Host": target.netloc})
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP | {"content-length"}:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args: object) -> None:
            pass

    return Forward


@pytest.fixture
def careless_s3(moto_server: str) -> Iterator[str]:
    """An endpoint URL that reaches moto through a proxy dropping every conditional-write header,
    as some S3-compatible servers do."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(moto_server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_store_whose_endpoint_ignores_conditions_is_refused(moto_server, careless_s3):
    bucket = make_bucket(moto_server)
    good = IndexStore(f"s3://{bucket}/store", s3_endpoint_url=moto_server)
    version = commit_stub(good)
    careless = IndexStore(f"s3://{bucket}/store", s3_endpoint_url=careless_s3)
    assert [m.version for m in careless.list_versions()] == [version]  # reads go through the proxy
    for move in (lambda: careless.promote(version), lambda: careless.begin_version("enwiki", "20240101")):
        with pytest.raises(Rejected, match="ignores If-None-Match and If-Match"):
            move()
    with pytest.raises(Rejected, match="ignores"), careless.build_lock("x"):
        pass
    assert careless.current() is None and good.fs.find(good.path("locks")) == []
