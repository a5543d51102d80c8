"""The catalogue the console reads again and again: reused while the store is unchanged, read again as
soon as a version is committed (even into a directory that was already listed while staging) or deleted."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from storage.catalog import CatalogCache, read_catalog
from storage.fs import atomic_write
from tests.fixtures.versions import commit_delta, fingerprint_for, make_version, random_passages


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
