"""The operator's console over real HTTP: every page and JSON endpoint over a real store (local and moto
S3) with full and delta versions, the diff, side-by-side answers, actions, hostile titles, the CSP."""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

from rag_model.server import create_app
from storage.store import IndexStore
from tests.fixtures.console_store import (
    ADDED_PAGE,
    EDITED_PAGE,
    XSS_TEXT,
    XSS_TITLE,
    ConsoleStore,
    build_console_store,
)
from tests.fixtures.s3 import make_bucket
from tests.test_cli_serve import run
from tests.test_server import ServerThread, ready_version, wait_for

TOKEN = "console-token"


@pytest.fixture(scope="module", params=["local", "s3"])
def console_store(request, tmp_path_factory, tiny_question_encoder, tiny_dpr) -> ConsoleStore:
    tmp = tmp_path_factory.mktemp("console")
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_server")
        store = IndexStore(f"s3://{make_bucket(endpoint)}/store", s3_endpoint_url=endpoint)
    else:
        store = IndexStore(str(tmp / "store"))
    return build_console_store(store, tiny_question_encoder, tiny_dpr.ctx_dir, tmp / "days")


@pytest.fixture(scope="module")
def client(console_store):
    app = create_app(console_store.store, admin_token=TOKEN, poll_seconds=0.1, cache_dir=None)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        wait_for(lambda: ready_version(c) == console_store.delta, timeout=60)
        yield c


def _text(html: str) -> str:
    """What a reader sees: tags out, whitespace folded, entities left as they are."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_overview_shows_what_is_serving_freshness_lineage_and_charts(client, console_store):
    r = client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    text = _text(r.text)
    assert f"serving: {console_store.delta}" in text
    assert "mode delta" in text and "generation 2" in text
    assert "20240102" in text and "day(s) old" in text  # the delta's applied day is the freshness mark
    assert f"delta of {console_store.full}" in text  # its lineage in the timeline
    for version in (console_store.full, console_store.delta, console_store.hostile):
        assert f'href="/ui/versions/{version}"' in r.text
    assert 'src="/ui/charts/bytes.svg' in r.text and 'src="/ui/charts/quality.svg' in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in r.text.replace('<script src="/ui/static/console.js" defer></script>', "")
    # The takedown action: a POST form the console's script sends with the token as a header.
    assert 'class="admin-action takedown" method="post" action="/v1/admin/takedown"' in r.text
    assert 'name="page"' in r.text and 'name="reason"' in r.text and 'id="admin-token"' in r.text


@pytest.mark.parametrize("name", ["bytes", "quality"])
def test_charts_are_svg_drawn_by_the_server(client, console_store, name):
    r = client.get(f"/ui/charts/{name}.svg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
    assert r.content.lstrip().startswith(b"<?xml") and b"<svg" in r.content
    assert console_store.delta[-16:].encode() in r.content  # versions on its axis
    assert b"<script" not in r.content


def test_version_page_of_a_delta_lists_its_changes_with_revision_links(client, console_store):
    r = client.get(f"/ui/versions/{console_store.delta}")
    assert r.status_code == 200
    text = _text(r.text)
    assert "Eiffel Tower (Paris)" in text and "was “Eiffel Tower”" in text  # moved: the rename shows
    assert "Louvre" in text and "added" in text
    assert f"https://en.wikipedia.org/w/index.php?curid={ADDED_PAGE}&amp;oldid=7001" in r.text
    assert f"curid={EDITED_PAGE}&amp;oldid=7000" in r.text
    assert "1 added" in text and "1 changed" in text and "(1 moved)" in text
    assert "recall_at_10" in text and "precision" in text and "Timings" in text
    assert 'action="/v1/admin/pin"' in r.text and 'id="admin-token"' in r.text
    assert "/tmp/" not in r.text and console_store.store.url not in r.text  # no paths without the token


def test_unknown_version_and_page_are_readable_404s(client):
    for path in ("/ui/versions/enwiki-20990101-20990101t000000z", "/ui/versions/..%2f..%2fetc", "/ui/nope",
                 "/ui/charts/nope.svg", "/ui/static/../pages.py"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("text/html"), path
        assert "404" in r.text and "Back to the overview" in r.text


def test_hostile_titles_and_links_render_as_text(client, console_store):
    r = client.get("/ui/compare", params={"q": XSS_TEXT, "a": console_store.full, "b": console_store.hostile,
                                          "k": 10})
    assert r.status_code == 200
    assert XSS_TITLE not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert 'href="javascript:' not in r.text and "<a href=\"javascript" not in r.text
    assert "&lt;a href=&#34;javascript:alert(2)&#34;&gt;here&lt;/a&gt;" in r.text
    page = client.get(f"/ui/versions/{console_store.hostile}")
    assert XSS_TITLE not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_compare_page_marks_what_entered_and_left(client, console_store):
    r = client.get("/ui/compare", params={"q": "Eiffel Tower in Paris", "a": console_store.full,
                                          "b": console_store.delta, "k": 10})
    assert r.status_code == 200
    assert 'class="hit left"' in r.text and 'class="hit entered"' in r.text
    text = _text(r.text)
    assert "entered the top 10: 2" in text and "left the top 10: 1" in text


def test_compare_json_and_diff_json_agree_with_the_store(client, console_store):
    r = client.post("/v1/compare", json={"query": "Eiffel Tower in Paris", "a": console_store.full,
                                         "b": console_store.delta, "k": 10})
    assert r.status_code == 200
    doc = r.json()
    left = [row["a"] for row in doc["rows"] if row["a"] and row["a"]["mark"] == "left"]
    entered = [row["b"] for row in doc["rows"] if row["b"] and row["b"]["mark"] == "entered"]
    assert [(h["page_id"], h["rev_id"]) for h in left] == [(EDITED_PAGE, 5000)]
    assert sorted((h["page_id"], h["rev_id"]) for h in entered) == [(EDITED_PAGE, 7000), (ADDED_PAGE, 7001)]
    d = client.get("/v1/diff", params={"a": console_store.full, "b": console_store.delta}).json()
    assert d["pages"] == {"added": 1, "changed": 1, "moved": 1, "removed": 0}
    assert d["passages"]["a"] == 6 and d["passages"]["b"] == 7 and d["passages"]["only_a"] == 1
    assert d["passages"]["only_b"] == 2 and d["bytes"]["only_b"] > 0
    assert client.get("/v1/diff", params={"a": "enwiki-20990101-20990101t000000z",
                                          "b": console_store.delta}).status_code == 404
    assert client.post("/v1/compare", json={"query": " ", "a": console_store.full,
                                            "b": "nope"}).status_code in (400, 404)


def test_versions_json_hides_paths_without_the_token(client, console_store):
    anonymous = client.get("/v1/versions").text
    assert console_store.store.url not in anonymous and "<store>" in anonymous
    admin = client.get("/v1/versions", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert admin["store"] == console_store.store.url
    versions = {v["version"]: v for v in admin["versions"]}
    assert versions[console_store.delta]["segments"] == [console_store.full]
    assert versions[console_store.delta]["shared_bytes"] == versions[console_store.full]["own_bytes"] > 0
    detail = client.get(f"/v1/versions/{console_store.delta}").json()
    assert detail["manifest"]["changes"]["moved"] and console_store.store.url not in str(detail)
    assert client.get("/v1/history").json()["history"][0]["to_version"] == console_store.delta


def test_actions_need_the_token_and_nothing_changes_on_get(client, console_store, caplog):
    store = console_store.store
    before = store.current()
    body = {"version": console_store.full}
    assert client.post("/v1/admin/pin", json=body).status_code == 401
    assert client.post("/v1/admin/pin", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/v1/admin/promote").status_code == 405
    for path in ("/ui", f"/ui/versions/{console_store.full}", "/ui/history", "/ui/compare"):
        client.get(path)
    assert store.current() == before and store.pinned() == set()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/admin/pin", json=body, headers=auth).status_code == 200
    assert store.pinned() == {console_store.full}
    assert "pinned" in _text(client.get("/ui").text)
    assert client.post("/v1/admin/unpin", json=body, headers=auth).status_code == 200
    assert store.pinned() == set()
    r = client.post("/v1/admin/promote", json={"version": "enwiki-20990101-20990101t000000z"}, headers=auth)
    assert r.status_code == 404 and store.current() == before
    # Every action an operator takes here is a serving event, like a rollback or a swap.
    with caplog.at_level("INFO", logger="ragindex.serving"):
        client.post("/v1/admin/pin", json=body, headers=auth)
        client.post("/v1/admin/unpin", json=body, headers=auth)
        assert client.post("/v1/admin/promote", json=body, headers=auth).status_code == 200
        assert client.post("/v1/admin/promote", json={"version": before.version}, headers=auth).status_code == 200
    logged = [(r.event, r.fields) for r in caplog.records if r.name == "ragindex.serving" and hasattr(r, "event")]
    moves = [(f["from"], f["to"], f["actor"]) for e, f in logged if e == "promote"]
    assert moves == [(before.version, console_store.full, "ragindex-console"),
                     (console_store.full, before.version, "ragindex-console")]
    assert [(e, f["version"]) for e, f in logged if e in ("pin", "unpin")] == [("pin", console_store.full),
                                                                               ("unpin", console_store.full)]
    assert store.current().version == before.version


def test_history_page_shows_every_move(client, console_store):
    text = _text(client.get("/ui/history").text)
    assert "the nightly delta" in text and "tests" in text and "promote" in text


def _store_args(console_store) -> list[str]:
    return ["--store", console_store.store.url]


@pytest.fixture
def cli_env(console_store, monkeypatch):
    """The CLI's settings from this test's environment alone: the store's S3 endpoint, if it has one."""
    from flows.settings import load_settings

    for key in [k for k in os.environ if k.startswith("RAGINDEX_")]:
        monkeypatch.delenv(key)
    if console_store.store.s3_endpoint_url:
        monkeypatch.setenv("RAGINDEX_S3_ENDPOINT_URL", console_store.store.s3_endpoint_url)
    load_settings.cache_clear()
    yield
    load_settings.cache_clear()


def test_cli_diff_prints_the_same_diff_as_the_api(console_store, capsys, cli_env):
    argv = ["diff", console_store.full, console_store.delta, *_store_args(console_store)]
    assert run([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pages"] == {"added": 1, "changed": 1, "moved": 1, "removed": 0}
    assert [c["page_id"] for c in doc["added"]] == [ADDED_PAGE]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "1 added, 1 changed (1 moved), 0 removed" in out and "Eiffel Tower → Eiffel Tower (Paris)" in out
    assert run(["diff", console_store.full, "enwiki-20990101-20990101t000000z", *_store_args(console_store)]) != 0
    err = capsys.readouterr().err
    assert "no version" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_query_compare_marks_entered_and_left(console_store, capsys, cli_env):
    argv = ["query", "Eiffel Tower in Paris", "--k", "10", "--compare", console_store.full, console_store.delta,
            *_store_args(console_store)]
    assert run([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["a"] == console_store.full and doc["b"] == console_store.delta
    assert doc["entered"] == 2 and doc["left"] == 1
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "ENTERED" in out and "LEFT" in out
