"""What gc must leave alone: the staging area and downloads of a build whose lease is alive (whatever
`--stale-hours` says), and anything reached through a symbolic link below the store's root."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime, timedelta

import pytest

from storage.fs import atomic_write, is_local
from storage.retention import gc
from storage.store import IndexStore
from tests.test_cli_ops import clean_settings  # noqa: F401 (a fixture)
from tests.test_cli_store import run
from tests.test_store import commit_stub

GC = {"stale_after": timedelta(0)}


def _build_in_progress(store: IndexStore) -> tuple[str, str]:
    """A staging area with a shard and the download it reads, both idle (mtimes a day old, locally)."""
    staging = store.begin_version("enwiki", "20240301")
    with atomic_write(store.fs, store.version_path(staging, "embeddings", "part-00000.npy")) as f:
        f.write(b"vectors")
    download = store.downloads_path("enwiki", "20240301", "enwiki-20240301-pages-articles.xml.bz2")
    with atomic_write(store.fs, download) as f:
        f.write(b"dump")
    if is_local(store.fs):  # S3 keeps its own times: there `stale_after=0` alone makes them look abandoned
        day_ago = time.time() - 86400
        for path in (store.version_path(staging), download):
            for found in [path, *store.fs.find(path)]:
                os.utime(found, (day_ago, day_ago))
    return staging, download


def test_gc_keeps_what_a_live_build_uses_until_its_lease_is_released(store):
    staging, download = _build_in_progress(store)
    with store.build_lock("refresh-index:embedding", ttl=timedelta(seconds=1)):
        time.sleep(2.5)  # more than twice the ttl: only the heartbeat keeps the lease alive
        report = gc(store, keep=1, **GC)
        assert report.deleted_staging == [] and report.deleted_downloads == []
        assert report.kept_for_build == "refresh-index:embedding"
        assert store.is_staging(staging) and store.fs.exists(download)
    report = gc(store, keep=1, **GC)  # released: abandoned now, judged by age again
    assert report.deleted_staging == [staging] and report.deleted_downloads == ["enwiki/20240301"]
    assert report.kept_for_build is None
    assert not store.fs.exists(store.version_path(staging)) and not store.fs.exists(download)


def test_cli_gc_with_zero_stale_hours_keeps_a_live_build(store, clean_settings, s3_endpoint, capsys):  # noqa: F811
    if s3_endpoint:
        clean_settings.setenv("RAGINDEX_S3_ENDPOINT_URL", s3_endpoint)
    staging, download = _build_in_progress(store)
    with store.build_lock("ragindex build"):
        code, out, err = run(["gc", "--keep", "1", "--stale-hours", "0", "--store", store.url], capsys)
        assert code == 0, err
        assert "a build holds the lock (ragindex build)" in out
        assert store.is_staging(staging) and store.fs.exists(download)


def test_an_expired_lease_protects_nothing(store):
    staging, download = _build_in_progress(store)
    dead = {"owner": "refresh-index:gone", "token": "0" * 32, "since": "2024-03-01T00:00:00+00:00",
            "expires_at": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(), "pid": 1, "host": "elsewhere"}
    with atomic_write(store.fs, store.path("locks", "build.json")) as f:
        f.write(json.dumps(dead).encode())
    report = gc(store, keep=1, **GC)
    assert report.deleted_staging == [staging] and report.deleted_downloads == ["enwiki/20240301"]
    assert report.kept_for_build is None


@pytest.fixture
def local_store(tmp_path) -> IndexStore:
    return IndexStore(str(tmp_path / "store"))


def test_gc_never_deletes_through_a_symlinked_version_directory(local_store, tmp_path):
    store = local_store
    old, *_ = [commit_stub(store, payload=f"v{i}".encode()) for i in range(3)]
    backup = tmp_path / "backup-disk" / old
    shutil.move(store.version_path(old), backup)  # the version moved to another disk, linked back
    os.symlink(backup, store.version_path(old))
    before = sorted(p.name for p in backup.iterdir())

    report = gc(store, keep=1, **GC)
    assert old not in report.deleted_versions and report.skipped_links == [f"versions/{old}"]
    assert sorted(p.name for p in backup.iterdir()) == before == ["data.bin", "manifest.json"]
    assert os.path.islink(store.version_path(old))


def test_gc_never_deletes_through_symlinked_downloads_or_staging(local_store, tmp_path):
    store = local_store
    commit_stub(store, date="20240101")
    other = tmp_path / "backup-disk"
    (other / "enwiki" / "20200101").mkdir(parents=True)
    (other / "enwiki" / "20200101" / "dump.xml.bz2").write_bytes(b"dump")
    os.makedirs(store.path("downloads"))
    os.symlink(other / "enwiki", store.path("downloads", "enwiki"))
    (other / "staging").mkdir()
    (other / "staging" / "_staging.json").write_text('{"created_at": "2024-01-01T00:00:00+00:00"}')
    (other / "staging" / "notes.txt").write_text("someone else's")
    os.symlink(other / "staging", store.path("versions", "enwiki-20200101-20200101t000000z"))

    report = gc(store, keep=1, **GC)
    assert report.deleted_downloads == [] and report.deleted_staging == []
    assert sorted(report.skipped_links) == ["downloads/enwiki", "versions/enwiki-20200101-20200101t000000z"]
    assert (other / "enwiki" / "20200101" / "dump.xml.bz2").read_bytes() == b"dump"
    assert sorted(p.name for p in (other / "staging").iterdir()) == ["_staging.json", "notes.txt"]
