"""End to end: live micro-deltas from a loopback EventStreams and Action API, through the refresh-index flow
(on a real temporary Prefect server) and `ragindex refresh --live`, on local disk and on the moto S3 server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from flows.refresh import refresh_index
from flows.settings import load_settings
from storage.store import IndexStore
from tests.fixtures.eventstreams import event
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import make_incr_day
from tests.test_delta_flow import ADDED, _articles, _finds_itself, _served

NOW = datetime.now(UTC)
DUMP = (NOW - timedelta(days=1)).strftime("%Y%m%d")


def _dt(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _common(mirror, tiny_dpr, store_url: str, **more) -> dict:
    return dict(wiki="enwiki", mirror=mirror.url, store_url=store_url, encoder=str(tiny_dpr.ctx_dir),
                encoder_kind="dpr", index_spec="flat", shard_rows=50, allow_count_change=True, **more)


def _titles(store: IndexStore, version: str) -> set[str]:
    return {title for title, _ in _served(store, version).values()}


@pytest.mark.parametrize("store_backend", ["local", "s3"], indirect=True)
def test_live_edit_delete_move_hide_new_then_up_to_date(prefect_api, mirror, tiny_dpr, gensim_excerpt, store_url,
                                                        s3_endpoint, eventstreams, action_api, monkeypatch, request):
    if s3_endpoint:
        monkeypatch.setenv("RAGINDEX_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("RAGINDEX_STREAM_IDLE_S", "1")
    load_settings.cache_clear()
    request.addfinalizer(load_settings.cache_clear)
    store = IndexStore(store_url, s3_endpoint_url=s3_endpoint)
    common = _common(mirror, tiny_dpr, store_url)
    live = dict(common, mode="live", streams_url=eventstreams.url, api_url=action_api.url)
    pages = _articles(gensim_excerpt, n=10)
    edited, deleted, moved, hidden, kept = pages[:5]
    rev = max(p.revision for p in pages) + 1
    mirror.add_run("enwiki", DUMP, pages)
    full = refresh_index(**common)
    assert full["status"] == "promoted"

    es, api = eventstreams, action_api
    es.add(event("mediawiki.revision-create", "enwiki", edited.page_id, edited.title, rev + 1, _dt(50)))
    api.add(rev + 1, edited.page_id, edited.title, edited.text + "\n\n" + ADDED)
    es.add(event("mediawiki.page-delete", "enwiki", deleted.page_id, deleted.title, deleted.revision, _dt(40)),
           partition=1)
    es.add(event("mediawiki.page-move", "enwiki", moved.page_id, moved.title + " (renamed)", rev + 2, _dt(30),
                 prior_state={"page_title": moved.title, "page_namespace": 0, "rev_id": moved.revision}))
    api.add(rev + 2, moved.page_id, moved.title + " (renamed)", moved.text)
    # An edit whose text is hidden between the event and the fetch: the page is removed.
    es.add(event("mediawiki.revision-create", "enwiki", hidden.page_id, hidden.title, rev + 3, _dt(20)))
    api.add(rev + 3, hidden.page_id, hidden.title, "libel " * 200)
    api.hide(rev + 3)
    new_text = pages[6].text.replace(pages[6].title, "Fox")
    es.add(event("mediawiki.revision-create", "enwiki", 990001, "Fox (new article)", rev + 4, _dt(10)))
    api.add(rev + 4, 990001, "Fox (new article)", new_text)
    es.add(event("mediawiki.revision-create", "dewiki", kept.page_id, kept.title, rev + 5, _dt(9)))  # other wiki
    es.add(event("mediawiki.revision-create", "enwiki", 990002, "Talk:Fox", rev + 6, _dt(8), ns=1))  # talk page

    first = refresh_index(**live)
    assert first["status"] == "promoted" and first["mode"] == "live", first["reason"]
    assert es.requests[0]["since"] == f"{DUMP[:4]}-{DUMP[4:6]}-{DUMP[6:]}T00:00:00Z"  # from the dump's own time
    v1 = store.manifest(first["version"])
    assert v1.parent == full["version"] and v1.lineage.stream is not None
    assert json.loads(v1.lineage.stream.last_event_id) and v1.lineage.stream.newest_event == _dt(8)
    assert [p for p, *_ in v1.changes["removed"]] == sorted([deleted.page_id, hidden.page_id])
    served = _served(store, v1.version)
    titles = {t for t, _ in served.values()}
    assert deleted.title not in titles and hidden.title not in titles and moved.title not in titles
    assert moved.title + " (renamed)" in titles and "Fox (new article)" in titles and "Talk:Fox" not in titles
    assert not any("libel" in text for _, text in served.values())
    own_edit = next(k for k, (t, text) in served.items() if t == edited.title and "quick brown fox" in text)
    assert _finds_itself(store, v1.version, own_edit)  # the answer follows the edit
    assert len(api.requests) == 1 and api.requests[0]["params"]["maxlag"] == "5"

    # Nothing new (the stream re-delivers its last event, which changes nothing): no version, up to date.
    again = refresh_index(**live)
    assert again["status"] == "up-to-date" and "already holds this content" in again["reason"]
    assert es.requests[-1]["last_event_id"] == v1.lineage.stream.last_event_id
    assert store.current().version == v1.version and len(store.list_versions()) == 2

    # A delete alone, replayed events included, is one more version; the replayed edit changes nothing.
    es.add(event("mediawiki.page-delete", "enwiki", kept.page_id, kept.title, kept.revision, _dt(5)))
    es.add(event("mediawiki.revision-create", "enwiki", edited.page_id, edited.title, rev + 1, _dt(4)))
    third = refresh_index(**live)
    assert third["status"] == "promoted", third["reason"]
    assert kept.title not in _titles(store, third["version"])
    assert _served(store, third["version"]).items() >= {k: v for k, v in served.items() if v[0] != kept.title}.items()


def test_live_beyond_retention_falls_back_to_the_days_in_one_line(prefect_api, mirror, tiny_dpr, gensim_excerpt,
                                                                 tmp_path, eventstreams, action_api):
    store_url = str(tmp_path / "store")
    common = _common(mirror, tiny_dpr, store_url)
    old = (NOW - timedelta(days=10)).strftime("%Y%m%d")
    mirror.add_run("enwiki", old, _articles(gensim_excerpt, n=4))
    refresh_index(**common)
    out = refresh_index(**common, mode="live", streams_url=eventstreams.url, api_url=action_api.url)
    assert out["status"] == "up-to-date" and "older than the streams keep (7 days)" in out["reason"]
    assert "falling back to the adds-changes days" in out["reason"] and not eventstreams.requests


def test_cli_refresh_live(prefect_api, mirror, tiny_dpr, gensim_excerpt, tmp_path, eventstreams, action_api,
                          capsys, monkeypatch):
    from cli.main import main

    monkeypatch.setenv("RAGINDEX_STREAM_IDLE_S", "1")
    load_settings.cache_clear()
    store_url = str(tmp_path / "store")
    pages = _articles(gensim_excerpt, n=4)
    mirror.add_run("enwiki", DUMP, pages)
    refresh_index(**_common(mirror, tiny_dpr, store_url))
    args = ["refresh", "--live", "--wiki", "enwiki", "--store", store_url, "--streams", eventstreams.url,
            "--api", action_api.url, "--encoder", str(tiny_dpr.ctx_dir), "--encoder-kind", "dpr",
            "--index-spec", "flat"]
    capsys.readouterr()
    main(args)
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "up-to-date" and out["mode"] == "live"

    eventstreams.add(event("mediawiki.page-delete", "enwiki", pages[0].page_id, pages[0].title, pages[0].revision,
                           _dt(3)))
    main(args)
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "promoted", out
    assert pages[0].title not in _titles(IndexStore(store_url), out["version"])

    with pytest.raises(SystemExit) as done:
        main(["refresh", "--live", "--full", "--wiki", "enwiki", "--store", store_url])
    assert done.value.code != 0 and "one of --full, --incremental and --live" in capsys.readouterr().err
    load_settings.cache_clear()


def test_a_full_build_from_an_older_dump_keeps_the_newer_live_states(prefect_api, mirror, tiny_dpr, gensim_excerpt,
                                                                     tmp_path, eventstreams, action_api, monkeypatch):
    """Never backwards: the next full dump is newer than the lineage's base but older than what live runs
    served: the live edit, the live deletion and the page created live all survive the rebuild."""
    monkeypatch.setenv("RAGINDEX_STREAM_IDLE_S", "1")
    load_settings.cache_clear()
    store_url = str(tmp_path / "store")
    store = IndexStore(store_url)
    common = _common(mirror, tiny_dpr, store_url)
    pages = _articles(gensim_excerpt, n=8)
    edited, deleted = pages[:2]
    rev = max(p.revision for p in pages) + 1
    older, newer = [(NOW - timedelta(days=d)).strftime("%Y%m%d") for d in (2, 1)]
    mirror.add_run("enwiki", older, pages[:7])
    refresh_index(**common)
    eventstreams.add(event("mediawiki.revision-create", "enwiki", edited.page_id, edited.title, rev + 1, _dt(30)))
    action_api.add(rev + 1, edited.page_id, edited.title, edited.text + "\n\n" + ADDED)
    eventstreams.add(event("mediawiki.page-delete", "enwiki", deleted.page_id, deleted.title, deleted.revision,
                           _dt(20)))
    eventstreams.add(event("mediawiki.revision-create", "enwiki", 990001, "Fox (new article)", rev + 2, _dt(10)))
    action_api.add(rev + 2, 990001, "Fox (new article)", pages[6].text.replace(pages[6].title, "Fox"))
    live = refresh_index(**common, mode="live", streams_url=eventstreams.url, api_url=action_api.url)
    assert live["status"] == "promoted"
    served_live = _served(store, live["version"])

    # A nightly day holding what live runs already applied (the edit; the deleted page's last revision)
    # changes nothing: the deleted page does not come back.
    day = [HistPage(edited.page_id, edited.title, [(rev + 1, edited.text + "\n\n" + ADDED)]),
           HistPage(deleted.page_id, deleted.title, [(deleted.revision, deleted.text)])]
    make_incr_day(mirror.root, "enwiki", newer, history_xml("enwiki", day), maxrevid=rev + 1)
    nightly = refresh_index(**common, mode="incremental")
    assert nightly["status"] == "up-to-date" and store.current().version == live["version"], nightly["reason"]

    # The newer full dump still holds the edited page's old text and the deleted page (it was dumped before).
    mirror.add_run("enwiki", newer, pages)  # + one page the older dump lacked
    full = refresh_index(**common, mode="full")
    assert full["status"] == "promoted" and full["mode"] == "full", full["reason"]
    assert full["counts"]["kept_newer_pages"] == 2 and full["counts"]["kept_removed_pages"] == 1
    rebuilt = _served(store, full["version"])
    assert store.manifest(full["version"]).source.dump_date == newer
    assert deleted.title not in {t for t, _ in rebuilt.values()}
    assert any("quick brown fox" in text for t, text in rebuilt.values() if t == edited.title)
    assert "Fox (new article)" in {t for t, _ in rebuilt.values()}
    assert rebuilt.items() >= served_live.items()  # all the live knowledge, now in one full version
    assert {t for t, _ in rebuilt.values()} - {t for t, _ in served_live.values()} == {pages[7].title}
    load_settings.cache_clear()
