"""A delta refresh killed part way resumes like a full build: SIGKILL a real `ragindex refresh --incremental`
process (its own session, its own temp directory) while it writes passages, again while it embeds, then run
it once more: the same version id throughout, the shards the killed runs embedded are kept (fewer passages
encoded), the version holds what an uninterrupted delta of the same days holds, and nothing is left in the
temp directory or the store. On local disk and on the moto S3 server.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from flows.refresh import refresh_index
from flows.settings import load_settings
from storage import layout
from storage.store import IndexStore
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import make_incr_day
from tests.fixtures.kills import kill_when, leftovers, staging_versions
from tests.fixtures.mirror import sample_pages

WIKI = "enwiki"
SUMMARIES = (layout.PASSAGES_SUMMARY_PATH, layout.EMBEDDINGS_SUMMARY_PATH)
RUN_COUNTERS = ("timings", "encoded", "reused", "skipped_shards", "embed_s")  # what a run did, not what it built


def _has(store: IndexStore, sub: str, pattern: str) -> bool:
    return any(store.fs.glob(store.version_path(v, sub, pattern)) for v in staging_versions(store))


def _writing_passages(store: IndexStore) -> bool:
    return _has(store, layout.PASSAGES_DIR, "part-*.parquet")


def _embedded_a_shard(store: IndexStore) -> bool:
    return _has(store, layout.EMBEDDINGS_DIR, "part-*.json")


def _content(store: IndexStore, version: str) -> dict:
    """What a version holds (whatever its id and its parent's), without what a run did."""
    m = store.manifest(version)
    summaries = {}
    for rel in SUMMARIES:
        with store.fs.open(store.version_path(version, rel), "rb") as f:
            summaries[rel] = {k: v for k, v in json.load(f).items() if k not in RUN_COUNTERS}
    return {"files": {rel: sha for rel, sha in m.files.items() if rel not in SUMMARIES}, **summaries,
            "counts": {k: v for k, v in m.counts.items() if k not in RUN_COUNTERS}, "changes": m.changes,
            "days": m.lineage.days, "status": m.status}


def _day_pages(rev: int) -> list[HistPage]:
    """New articles of fresh words (every passage needs the encoder), and one edit of a base page."""
    fresh = [HistPage(900 + i, f"New article {i}", [(rev + i, " ".join(f"n{i}y{j}" for j in range(260)))])
             for i in range(10)]
    edited = sample_pages(1)[0]
    return [*fresh, HistPage(edited.page_id, edited.title, [(rev + 50, edited.text + " and one more sentence")])]


@pytest.mark.slow
@pytest.mark.parametrize("store_backend", ["local", "s3"], indirect=True)
def test_a_killed_delta_resumes_the_same_version(mirror, tiny_dpr, prefect_api, store_url, s3_endpoint, tmp_path,
                                                monkeypatch, request):
    base_pages = sample_pages(6)
    mirror.add_run(WIKI, "20240101", base_pages)
    common = dict(wiki=WIKI, mirror=mirror.url, encoder=str(tiny_dpr.ctx_dir), encoder_kind="dpr",
                  index_spec="flat", shard_rows=4, precision="fp32", allow_count_change=True)
    rev = max(p.revision for p in base_pages) + 1
    if s3_endpoint:
        monkeypatch.setenv("RAGINDEX_S3_ENDPOINT_URL", s3_endpoint)
    load_settings.cache_clear()  # settings are read once at the edge: this test's runs must see the endpoint
    request.addfinalizer(load_settings.cache_clear)
    reference_url = str(tmp_path / "reference")  # an uninterrupted delta of the same days, on local disk
    for url in (reference_url, store_url):
        assert refresh_index(store_url=url, **common)["status"] == "promoted"
    make_incr_day(mirror.root, WIKI, "20240102", history_xml(WIKI, _day_pages(rev)), maxrevid=rev + 50)
    uninterrupted = refresh_index(store_url=reference_url, mode="incremental", **common)
    assert uninterrupted["status"] == "promoted" and uninterrupted["mode"] == "delta"

    store = IndexStore(store_url, s3_endpoint_url=s3_endpoint)
    scratch = tmp_path / "tmp"  # the killed runs' system temp directory
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    args = [str(Path(sys.executable).parent / "ragindex"), "refresh", "--incremental", "--store", store_url,
            "--wiki", WIKI, "--mirror", mirror.url, "--encoder", str(tiny_dpr.ctx_dir), "--encoder-kind", "dpr",
            "--index-spec", "flat", "--shard-rows", "4", "--precision", "fp32", "--allow-count-change"]
    kill_when(_writing_passages, args, env, store, tmp_path / "killed-passages.log")
    assert [p.name for p in scratch.glob("ragindex-delta-*")] == []  # its scratch stayed in its staging area
    [first] = staging_versions(store)
    kill_when(_embedded_a_shard, args, env, store, tmp_path / "killed-embed.log")
    assert staging_versions(store) == [first]  # resumed, not begun again under a new id
    assert store.fs.glob(store.version_path(first, layout.EMBEDDINGS_DIR, "part-*.json"))

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    outcome = refresh_index(store_url=store_url, mode="incremental", **common)

    assert outcome["status"] == "promoted" and outcome["mode"] == "delta", outcome
    assert outcome["version"] == first
    # The shards the killed run embedded were kept, not encoded again.
    assert outcome["counts"]["encoded_this_run"] < uninterrupted["counts"]["encoded_this_run"]
    assert _content(store, first) == _content(IndexStore(reference_url), uninterrupted["version"])
    assert set(store.manifest(first).files) == set(store.version_files(first))
    assert leftovers(store) == []
    assert [p.name for p in scratch.glob("ragindex-delta-*")] == []
