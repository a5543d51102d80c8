"""The catalogue the console reads again and again: reused while the store is unchanged, read again as
soon as a version is committed (even into a directory that was already listed while staging) or deleted."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np

from rag_model.console.data import Freshness
from storage.catalog import CatalogCache, LineageSummary, VersionEntry, read_catalog
from storage.fs import atomic_write
from storage.manifest import Lineage, StreamPosition
from storage.store import IndexStore
from tests.fixtures.versions import clustered_vectors, commit_delta, fingerprint_for, make_version, random_passages


def _versions(catalog) -> set[str]:
    return {v.version for v in catalog.versions}


def test_cache_follows_commits_deletions_and_pointer_moves(store):
    base = make_version(store, random_passages(12, pages=4), np.random.default_rng(0).standard_normal((12, 8)),
                        fingerprint_for(8), promote=True)
    cache = CatalogCache()
    assert _versions(cache.read(store)) == {base}

    staged = store.begin_version("testwiki", "20240105")
    assert _versions(cache.read(store)) == {base}  # staging: not a version yet
    manifest = store.manifest(base).model_copy(update={"version": staged, "created_at": datetime.now(UTC)})
    for rel in manifest.files:  # the same files, so that the committed version is whole
        with atomic_write(store.fs, store.version_path(staged, rel)) as f:
            f.write(store.fs.cat_file(store.version_path(base, rel)))
    store.commit_version(manifest)
    assert _versions(cache.read(store)) == {base, staged}  # same listing, but now committed

    delta = commit_delta(store, base, ["20240102"])
    catalog = cache.read(store)
    assert _versions(catalog) == {base, staged, delta}
    entry = next(v for v in catalog.versions if v.version == delta)
    assert entry.shared_bytes == next(v.own_bytes for v in catalog.versions if v.version == base) > 0
    assert entry.lineage.watermark == "20240102"
    assert next(v for v in catalog.versions if v.version == base).recall is not None

    store.promote(staged)
    store.pin(delta)
    marks = {v.version: (v.current, v.pinned) for v in cache.read(store).versions}
    assert marks[staged] == (True, False) and marks[delta] == (False, True)  # CURRENT and pins read every time

    store.fs.rm(store.version_path(delta), recursive=True)
    assert _versions(cache.read(store)) == {base, staged}
    assert cache.read(store).to_json()["versions"] == read_catalog(store).to_json()["versions"]


def test_freshness_says_how_far_live_runs_have_applied_the_streams(tmp_path):
    """A lineage extended by live runs is as fresh as the newest EventStreams event it applied: the catalogue
    carries that event's time and the console's freshness card says how long ago it was."""
    store = IndexStore(str(tmp_path / "store"))
    vid = make_version(store, random_passages(30), clustered_vectors(30, 8), fingerprint_for(8), wiki="enwiki")
    newest = (datetime.now(UTC) - timedelta(minutes=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stream = StreamPosition(last_event_id='[{"topic":"eqiad.mediawiki.revision-create","partition":0,"offset":9}]',
                            newest_event=newest)
    manifest = store.manifest(vid)
    live = manifest.model_copy(update={"lineage": Lineage(base_version=vid, base_dump="20240101", stream=stream)})
    summary = LineageSummary.of(live)
    assert summary.live_to == newest and summary.to_json()["live_to"] == newest
    entry = VersionEntry(version=vid, status="ready", current=True, previous=False, pinned=False, reason=None,
                         path="", own_bytes=0, lineage=summary)
    fresh = Freshness.of(entry)
    assert (fresh.watermark, fresh.live_to) == ("20240101", newest)
    assert fresh.live_age is not None and fresh.live_age.startswith(("6m", "7m")), fresh.live_age
    assert Freshness.of(replace(entry, lineage=LineageSummary.of(manifest))).live_to is None  # a full build
