"""A live run killed part way replays from the last committed stream position: SIGKILL a real
`ragindex refresh --live` process (its own session) while it reads and fetches, the moment its staging version
appears, and once it has embedded a shard; then run it to the end. No event is lost or applied twice: the
served pages, the version's content and the stream position equal an uninterrupted run's over the same events,
one live version is published, and a run after it finds nothing to do.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.refresh import refresh_index
from flows.settings import load_settings
from storage.store import IndexStore
from tests.fixtures.eventstreams import event
from tests.fixtures.kills import kill_when, leftovers, staging_versions
from tests.test_delta_flow import _articles, _served
from tests.test_delta_resume import _content, _embedded_a_shard

NOW = datetime.now(UTC)
DUMP = (NOW - timedelta(days=1)).strftime("%Y%m%d")
WIKI = "enwiki"


def _dt(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _after(seconds: float) -> Callable[[IndexStore], bool]:
    """A kill point `seconds` after the process started (its imports, Prefect, the stream read and fetch)."""
    at = time.monotonic() + seconds
    return lambda store: time.monotonic() >= at


def _queue_events(eventstreams, action_api, pages, rev: int) -> None:
    """New articles of fresh words (every passage needs the encoder), an edit, a delete, a move, a burst."""
    edited, deleted, moved = pages[:3]
    for i in range(10):
        eventstreams.add(event("mediawiki.revision-create", WIKI, 900 + i, f"New article {i}", rev + i, _dt(60 - i)))
        action_api.add(rev + i, 900 + i, f"New article {i}", " ".join(f"n{i}y{j}" for j in range(260)))
    for n in range(3):  # a burst on one page: only its last revision is served
        eventstreams.add(event("mediawiki.revision-create", WIKI, edited.page_id, edited.title, rev + 20 + n,
                               _dt(40 - n)), partition=n % 2)
        action_api.add(rev + 20 + n, edited.page_id, edited.title, edited.text + f" and burst edit {n}.")
    eventstreams.add(event("mediawiki.page-delete", WIKI, deleted.page_id, deleted.title, deleted.revision, _dt(30)))
    eventstreams.add(event("mediawiki.page-move", WIKI, moved.page_id, moved.title + " (renamed)", rev + 30, _dt(20),
                           prior_state={"page_title": moved.title, "page_namespace": 0}))
    action_api.add(rev + 30, moved.page_id, moved.title + " (renamed)", moved.text)


@pytest.mark.slow
def test_a_killed_live_run_replays_to_the_same_version(mirror, tiny_dpr, gensim_excerpt, prefect_api, tmp_path,
                                                      eventstreams, action_api, monkeypatch, request):
    monkeypatch.setenv("RAGINDEX_STREAM_IDLE_S", "1")
    load_settings.cache_clear()  # settings are read once at the edge: this test's runs must see the idle time
    request.addfinalizer(load_settings.cache_clear)
    pages = _articles(gensim_excerpt, n=6)
    mirror.add_run(WIKI, DUMP, pages)
    common = dict(wiki=WIKI, mirror=mirror.url, encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr",
                  index_spec="flat", shard_rows=4, precision="fp32", allow_count_change=True)
    reference_url, store_url = str(tmp_path / "reference"), str(tmp_path / "store")
    for url in (reference_url, store_url):
        assert refresh_index(store_url=url, **common)["status"] == "promoted"
    _queue_events(eventstreams, action_api, pages, max(p.revision for p in pages) + 1)
    live = dict(mode="live", streams_url=eventstreams.url, api_url=action_api.url)
    uninterrupted = refresh_index(store_url=reference_url, **common, **live)
    assert uninterrupted["status"] == "promoted" and uninterrupted["mode"] == "live", uninterrupted["reason"]

    store = IndexStore(store_url)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    args = [str(Path(sys.executable).parent / "ragindex"), "refresh", "--live", "--store", store_url, "--wiki", WIKI,
            "--streams", eventstreams.url, "--api", action_api.url, "--encoder", str(tiny_dpr.ctx_dir),
            "--encoder-kind", "dpr", "--index-spec", "flat", "--shard-rows", "4", "--precision", "fp32",
            "--allow-count-change"]
    kill_when(_after(2.0), args, env, store, tmp_path / "killed-early.log")
    kill_when(lambda s: bool(staging_versions(s)), args, env, store, tmp_path / "killed-staging.log")
    kill_when(_embedded_a_shard, args, env, store, tmp_path / "killed-embed.log")
    assert len(staging_versions(store)) == 1  # resumed, not begun again under a new id

    outcome = refresh_index(store_url=store_url, **common, **live)

    assert outcome["status"] == "promoted" and outcome["mode"] == "live", outcome["reason"]
    reference = IndexStore(reference_url)
    assert _served(store, outcome["version"]) == _served(reference, uninterrupted["version"])
    assert _content(store, outcome["version"]) == _content(reference, uninterrupted["version"])
    position = store.manifest(outcome["version"]).lineage.stream
    assert position == reference.manifest(uninterrupted["version"]).lineage.stream
    assert len(store.list_versions()) == len(reference.list_versions()) == 2  # the full build and one live version
    assert leftovers(store) == []
    again = refresh_index(store_url=store_url, **common, **live)  # the replayed events change nothing
    assert again["status"] == "up-to-date" and store.current().version == outcome["version"], again["reason"]
