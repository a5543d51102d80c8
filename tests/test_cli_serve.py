"""`ragindex query` (in-process) and `ragindex serve` (a real subprocess on loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cli.main import main
from storage.store import IndexStore
from tests.fixtures.processes import free_port, stop_process, wait_until_answering
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version
from tests.test_server_limits import HEAD, seconds_until_closed


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_question_encoder):
    store = IndexStore(str(tmp_path_factory.mktemp("cli") / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000, promote=True)
    return store, a, b


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_query_json_answers_from_current(cli_store, capsys):
    store, _, b = cli_store
    title, text = TOPICS_B[1]
    assert run(["query", f"{title} {text}", "--k", "2", "--store", store.url, "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)  # one JSON document and nothing else on stdout
    assert doc["version"] == b.version and len(doc["hits"]) == 2
    assert doc["hits"][0]["title"] == title and doc["hits"][0]["page_id"] in b.page_ids


def test_query_a_named_version_with_an_explicit_encoder(cli_store, tiny_dpr, capsys):
    store, a, _ = cli_store
    argv = ["query", "tower in paris", "--version", a.version, "--store", store.url,
            "--question-encoder", str(tiny_dpr.question_dir), "--question-encoder-kind", "dpr", "--json"]
    assert run(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == a.version and all(h["page_id"] in a.page_ids for h in doc["hits"])


def test_query_table_output(cli_store, capsys):
    store, _, b = cli_store
    assert run(["query", "capital city", "--k", "1", "--store", store.url]) == 0
    assert b.version in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["query", "x", "--k", "0"], "--k"),
        (["query", "   "], "empty question"),
        (["query", "x", "--version", "no/such"], "invalid version id"),
        (["query", "x", "--version", "enwiki-20000101-20000101t000000z"], "no version"),
        (["query", "x", "--question-encoder-kind", "weird"], "dpr or mean"),
    ],
)
def test_query_bad_input_is_one_line(cli_store, capsys, argv, fragment):
    store, _, _ = cli_store
    assert run([*argv, "--store", store.url]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_query_without_current(tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # a store that exists but holds nothing yet (one that does not exist is refused)
    assert run(["query", "x", "--store", str(tmp_path / "empty")]) == 2
    assert "no CURRENT version" in capsys.readouterr().err


def test_serve_subprocess(cli_store, tmp_path):
    store, a, b = cli_store
    port = free_port()
    env = {**os.environ, "RAGINDEX_ADMIN_TOKEN": "cli-token", "RAGINDEX_STORE_URL": str(tmp_path / "unused")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--store", store.url, "--host", "127.0.0.1", "--port", str(port),
         "--poll-seconds", "0.2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/retrieve", json={"query": "capital city", "k": 2})
        assert r.status_code == 200 and r.json()["version"] == b.version
        auth = {"Authorization": "Bearer cli-token"}
        r = httpx.post(url + "/v1/admin/rollback", json={"version": a.version}, headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["serving"] == a.version
        assert httpx.post(url + "/v1/generate", json={"query": "x"}).status_code == 503
    finally:
        proc.terminate()
        proc.wait(20)
        store.promote(b.version)  # leave the module's store as the other tests expect


def test_serve_cuts_off_slow_clients_with_its_options(cli_store, tmp_path):
    store, _, b = cli_store
    port = free_port()
    env = {**os.environ, "RAGINDEX_STORE_URL": str(tmp_path / "unused")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--store", store.url, "--host", "127.0.0.1", "--port", str(port),
         "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "8"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answering(url + "/readyz", proc, 60, "ragindex serve")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            seconds = seconds_until_closed(sock, HEAD, b"X-Slow: " + b"a" * 100, give_up_s=8)
        assert seconds is not None and seconds < 3.0, f"slow head held the connection for {seconds}s"
        r = httpx.post(url + "/v1/retrieve", json={"query": "capital city", "k": 1})
        assert r.status_code == 200 and r.json()["version"] == b.version
    finally:
        stop_process(proc, timeout=20)


@pytest.mark.parametrize("option", ["--header-timeout", "--body-timeout", "--keep-alive", "--max-connections",
                                    "--reverify-mib-per-second"])
def test_serve_refuses_a_limit_that_is_not_positive(cli_store, capsys, option):
    store, _, _ = cli_store
    assert run(["serve", "--store", store.url, option, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{option} must be positive" in err and "Traceback" not in err


def test_serve_refuses_a_negative_reverify_period(cli_store, capsys):
    store, _, _ = cli_store
    assert run(["serve", "--store", store.url, "--reverify-seconds", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--reverify-seconds must be 0 or more" in err and "Traceback" not in err
