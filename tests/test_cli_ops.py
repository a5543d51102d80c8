"""Operating the CLI for real: failures end on one line (Prefect's logging included), a store that
does not exist is an error, bad settings name their variable, `--version`, and `ragindex serve`'s
busy port, logs and access log."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from importlib.metadata import version as package_version
from pathlib import Path

import httpx
import pytest

from flows.settings import Settings, load_settings, open_store
from storage.errors import NotFound
from storage.store import IndexStore
from tests.fixtures.processes import free_port, stop_process, wait_until_answering
from tests.fixtures.rag import TOPICS_A, TOPICS_B, build_version
from tests.fixtures.s3 import make_bucket
from tests.test_cli_store import run

RAGINDEX = [sys.executable, "-m", "cli"]  # the same main() as the console script
TOKEN = "s3cret-admin-token-0f9e"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without ragindex or Prefect settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGINDEX_", "PREFECT_"))}
    return {**env, **extra}


@pytest.fixture
def clean_settings(monkeypatch):
    for key in [k for k in os.environ if k.startswith("RAGINDEX_")]:
        monkeypatch.delenv(key)
    load_settings.cache_clear()
    yield monkeypatch
    load_settings.cache_clear()


# -- --version -------------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    code, out, err = run(["--version"], capsys)
    assert (code, out, err) == (0, f"ragindex {package_version('ragindex')}\n", "")


# -- settings: the variable, not the field -----------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "argv", "expected"),
    [
        ("RAGINDEX_MEMORY_BUDGET", "lots", ["versions"], "RAGINDEX_MEMORY_BUDGET: not a size: 'lots'"),
        ("RAGINDEX_PORT", "eighty", ["serve"],
         "RAGINDEX_PORT: Input should be a valid integer, unable to parse string as an integer (got 'eighty')"),
        ("RAGINDEX_ENCODER_KIND", "clip", ["query", "x"], "RAGINDEX_ENCODER_KIND: Input should be 'dpr' or 'mean'"),
        # refresh reads its settings before a Prefect server starts
        ("RAGINDEX_CACHE_MAX_SIZE", "-3", ["refresh", "--source", "x.xml"],
         "RAGINDEX_CACHE_MAX_SIZE: not a size: '-3'"),
    ],
)
def test_a_bad_setting_names_its_environment_variable(clean_settings, tmp_path, capsys, variable, value, argv,
                                                       expected):
    clean_settings.setenv(variable, value)
    code, _, err = run([*argv, "--store", str(tmp_path)], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {expected}"), line
    assert variable.removeprefix("RAGINDEX_").lower() + ":" not in line  # the field's own name is not the story


# -- a store that does not exist ------------------------------------------------------------------------


def test_reading_commands_refuse_a_store_that_does_not_exist(clean_settings, tmp_path, capsys):
    typo = tmp_path / "sotre"
    for argv in (["query", "x", "--store", str(typo)], ["serve", "--store", str(typo), "--port", "0"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and f"store {typo} does not exist" in one_error_line(err), argv
    assert not typo.exists()  # refusing did not create it
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    code, _, err = run(["query", "x", "--store", str(a_file)], capsys)
    assert code == 2 and f"store {a_file} is not a directory" in one_error_line(err)


def test_an_empty_store_is_not_an_error(clean_settings, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(["versions", "--store", str(empty), "--json"], capsys)
    assert code == 0 and json.loads(out)["versions"] == [], err
    code, _, err = run(["query", "x", "--store", str(empty)], capsys)
    assert code == 2 and "no CURRENT version" in one_error_line(err)  # past the existence check


@pytest.mark.parametrize("argv", [["versions"], ["promote", "enwiki-20240101-20240101t000000z"], ["rollback"],
                                  ["gc", "--keep", "1"], ["pin", "enwiki-20240101-20240101t000000z"],
                                  ["unpin", "enwiki-20240101-20240101t000000z"]])
def test_store_commands_refuse_a_store_that_does_not_exist(clean_settings, tmp_path, capsys, argv):
    typo = tmp_path / "sotre"
    code, _, err = run([*argv, "--store", str(typo)], capsys)
    assert code == 2 and f"store {typo} does not exist" in one_error_line(err)
    assert not typo.exists()


def test_on_s3_the_bucket_must_exist_and_the_prefix_may_be_empty(clean_settings, moto_server, capsys):
    settings = Settings(s3_endpoint_url=moto_server)
    bucket = make_bucket(moto_server)
    store = open_store(f"s3://{bucket}/nothing/here/yet", settings, must_exist=True)
    assert store.list_versions() == []
    with pytest.raises(NotFound, match="bucket 'no-such-bucket-c0ffee' does not exist"):
        open_store("s3://no-such-bucket-c0ffee/store", settings, must_exist=True)
    assert open_store("s3://no-such-bucket-c0ffee/store", settings).url == "s3://no-such-bucket-c0ffee/store"

    clean_settings.setenv("RAGINDEX_S3_ENDPOINT_URL", moto_server)
    code, _, err = run(["query", "x", "--store", "s3://no-such-bucket-c0ffee/store"], capsys)
    assert code == 2 and "bucket 'no-such-bucket-c0ffee' does not exist" in one_error_line(err)
    code, _, err = run(["query", "x", "--store", f"s3://{bucket}/store"], capsys)
    assert code == 2 and "no CURRENT version" in one_error_line(err)


# -- refresh: a failure is one line, however deep, and the run page keeps the rest ---------------------------


def corrupt_dump(directory: Path, wiki: str) -> Path:
    """A dump whose bz2 stream breaks after its header: the passages step fails in a Prefect task."""
    path = directory / f"{wiki}-20240101-pages-articles.xml.bz2"
    path.write_bytes(b"BZh91AY&SY" + b"\x00" * 200)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("prefect", ["temporary server", "api server"])
def test_a_failed_refresh_ends_on_one_line(prefect, request, tmp_path, tiny_dpr):
    wiki = "opsfailwiki" if prefect == "api server" else "enwiki"
    source = corrupt_dump(tmp_path, wiki)
    if prefect == "api server":
        api = request.getfixturevalue("prefect_api")
        env = cli_env(PREFECT_API_URL=api)
    else:  # what a plain `ragindex refresh` does: Prefect starts a server for the process
        env = cli_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    done = subprocess.run(
        [*RAGINDEX, "refresh", "--source", str(source), "--store", str(tmp_path / "store"),
         "--encoder", str(tiny_dpr.ctx_dir), "--encoder-kind", "dpr", "--precision", "fp32"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert "Finished in state Failed" not in output and "Encountered exception" not in output
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: refresh-index failed in step 'passages': corrupt bz2 data in "
                                f"{source.name}"), output
    assert sum(line.startswith("error:") for line in lines) == 1 and done.stdout == ""
    if prefect == "api server":  # the run page still has the whole story
        logs = httpx.post(f"{api}/logs/filter", json={"logs": {"level": {"ge_": 40}}, "sort": "TIMESTAMP_DESC",
                                                     "limit": 200}).json()
        failures = [log["message"] for log in logs
                    if "Encountered exception during execution" in log["message"] and source.name in log["message"]]
        assert failures and all("Traceback" in message for message in failures)


# -- serve: a busy port, logs, access log ---------------------------------------------------------------------


def test_serve_on_a_busy_port_is_one_line_before_loading_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*RAGINDEX, "serve", "--store", str(tmp_path), "--port", str(port),
                               "--rag-model", str(tmp_path / "never-loaded")],
                              capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert one_error_line(done.stderr) == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_serve_refuses_an_unknown_log_level(tmp_path, capsys):
    code, _, err = run(["serve", "--store", str(tmp_path), "--log-level", "loud"], capsys)
    assert code == 2 and "--log-level must be one of debug, info, warning, error" in one_error_line(err)


_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def logfmt_events(text: str) -> list[dict]:
    """The log lines of `text` that carry an event, as dicts (quoted values JSON-decoded)."""
    found = []
    for line in text.splitlines():
        pairs = {k: json.loads(v) if v.startswith('"') else v for k, v in _PAIR.findall(line)}
        if "event" in pairs and "ts" in pairs:
            found.append(pairs)
    return found


def test_serve_logs_swaps_refusals_rollbacks_and_requests(tmp_path, tiny_question_encoder):
    from tests.fixtures.versions import fingerprint_for

    store = IndexStore(str(tmp_path / "store"))
    a = build_version(store, tiny_question_encoder, TOPICS_A, 1000, 5000)
    b = build_version(store, tiny_question_encoder, TOPICS_B, 2000, 6000, promote=True)
    alien = build_version(store, tiny_question_encoder, TOPICS_B, 3000, 7000,
                          fingerprint=fingerprint_for(tiny_question_encoder.dim, kind="dpr"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "serve.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [*RAGINDEX, "serve", "--store", store.url, "--port", str(port), "--log-level", "info",
             "--poll-seconds", "3600"],  # only the admin endpoints move it: every swap below is one we asked for
            env=cli_env(RAGINDEX_ADMIN_TOKEN=TOKEN), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until_answering(url + "/readyz", proc, 60, "ragindex serve")
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert httpx.post(url + "/v1/retrieve", json={"query": "capital city", "k": 1}).status_code == 200
            assert httpx.post(url + "/v1/admin/reload", headers={"Authorization": "Bearer wrong-guess-77"}
                              ).status_code == 403
            r = httpx.post(url + "/v1/admin/rollback", json={"version": a.version}, headers=auth, timeout=30)
            assert r.status_code == 200 and r.json()["serving"] == a.version
            store.promote(alien.version)
            r = httpx.post(url + "/v1/admin/reload", headers=auth, timeout=30)
            assert r.status_code == 200 and r.json()["swap"]["ok"] is False
        finally:
            stop_process(proc, timeout=20)
    text = log_file.read_text()
    assert TOKEN not in text and "wrong-guess-77" not in text and "Traceback" not in text
    events = logfmt_events(text)
    swaps = [(e["from"], e["to"]) for e in events if e["event"] == "swap"]
    assert swaps == [("null", b.version), (b.version, a.version)], text
    first = next(e for e in events if e["event"] == "swap")
    assert first["level"] == "info" and first["logger"] == "ragindex.serving"
    assert float(first["load_s"]) > 0 and float(first["warm_up_s"]) >= 0 and float(first["total_s"]) > 0
    rollback = next(e for e in events if e["event"] == "rollback")
    assert (rollback["from"], rollback["to"], rollback["level"]) == (b.version, a.version, "warning")
    refused = next(e for e in events if e["event"] == "swap_refused")
    assert (refused["from"], refused["to"], refused["level"]) == (a.version, alien.version, "error")
    assert "fingerprint" in refused["error"] and refused["error_kind"] == "Rejected"
    requests = {(e["method"], e["path"], e["status"]) for e in events if e["event"] == "request"}
    assert {("POST", "/v1/retrieve", "200"), ("POST", "/v1/admin/reload", "403"),
            ("POST", "/v1/admin/rollback", "200"), ("GET", "/readyz", "200")} <= requests
    access = next(e for e in events if e["event"] == "request" and e["path"] == "/v1/retrieve")
    assert access["logger"] == "ragindex.access" and float(access["duration_ms"]) > 0
