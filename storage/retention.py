"""Retention: what `gc` deletes and what it must never delete.

Versions beyond the newest `keep` ready ones (rejected versions and staging areas never count
toward `keep`) go, unless CURRENT, previous or pinned. The protected set is re-read under the
pointer lock right before each version's manifest is removed, so a promote or rollback running at
the same time can never leave CURRENT naming a deleted version. Corrupt manifests go too (nothing
can serve them). Then staging areas idle for `stale_after`, downloads no kept version uses, and
Prefect results that refer only to versions that are gone.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from storage.errors import Rejected
from storage.layout import MANIFEST, STAGING_MARKER
from storage.pointer import read_json

if TYPE_CHECKING:
    from storage.store import IndexStore

RESULTS_DIR = "prefect-results"
_VERSION_REF = re.compile(rb"versions/([a-z0-9._-]{1,200})/")
_MAX_RESULT_BYTES = 1 << 20  # result records are small; a bigger file is not one of ours


@dataclass
class GcReport:
    deleted_versions: list[str] = field(default_factory=list)
    deleted_staging: list[str] = field(default_factory=list)
    deleted_downloads: list[str] = field(default_factory=list)
    deleted_corrupt: list[str] = field(default_factory=list)
    deleted_results: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def collect(store: IndexStore, keep: int, stale_after: timedelta, dry_run: bool) -> GcReport:
    if keep < 1:
        raise Rejected("gc --keep must be at least 1")
    report = GcReport()
    versions, corrupt = store.scan_versions()
    newest = {m.version for m in [m for m in versions if m.status == "ready"][-keep:]}
    doomed = [m.version for m in versions if m.version not in newest] + [c.version for c in corrupt]
    gone: set[str] = set()
    for version_id in doomed:
        if _remove_manifest_unless_protected(store, version_id, dry_run, MANIFEST):
            gone.add(version_id)
            if not dry_run:
                store.fs.rm(store.version_path(version_id), recursive=True)
    corrupt_ids = {c.version for c in corrupt}
    report.deleted_versions = [v for v in doomed if v in gone and v not in corrupt_ids]
    report.deleted_corrupt = [v for v in doomed if v in gone and v in corrupt_ids]
    kept = [m for m in versions if m.version not in gone]
    report.kept = [m.version for m in kept] + [v for v in sorted(corrupt_ids) if v not in gone]

    used = {(m.source.wiki, m.source.dump_date) for m in kept}
    alive = {m.version for m in kept} | (corrupt_ids - gone)
    visible = {m.version for m in versions} | corrupt_ids
    for version_id in store._version_dirs():
        if version_id in visible:
            continue
        marker, _ = read_json(store.fs, store.version_path(version_id, STAGING_MARKER))
        if _now() - last_activity(store, store.version_path(version_id), marker) < stale_after:
            alive.add(version_id)
            if marker:
                used.add((marker.get("wiki"), marker.get("dump_date")))
            continue
        report.deleted_staging.append(version_id)
        if not dry_run:
            store.fs.rm(store.version_path(version_id), recursive=True)
    for wiki_dir in _ls_dirs(store, store.path("downloads")):
        for date_dir in _ls_dirs(store, wiki_dir):
            wiki, date = wiki_dir.rsplit("/", 1)[-1], date_dir.rsplit("/", 1)[-1]
            if (wiki, date) in used or _now() - last_activity(store, date_dir, None) < stale_after:
                continue
            report.deleted_downloads.append(f"{wiki}/{date}")
            if not dry_run:
                store.fs.rm(date_dir, recursive=True)
    report.deleted_results = _collect_results(store, alive, stale_after, dry_run)
    return report


def _remove_manifest_unless_protected(store: IndexStore, version_id: str, dry_run: bool, manifest: str) -> bool:
    """Under the pointer lock: True (manifest removed, unless a dry run) when `version_id` is not
    CURRENT, previous or pinned right now. Once the manifest is gone no promote can pick it up, so
    the data can be deleted after the lock is released."""
    if dry_run:
        return version_id not in _protected(store)
    with store._pointer_lock(f"gc {version_id}"):
        if version_id in _protected(store):
            return False
        path = store.version_path(version_id, manifest)
        if store.fs.exists(path):
            store.fs.rm_file(path)
    return True


def _protected(store: IndexStore) -> set[str]:
    protected = set(store.pinned())
    current = store.current()
    if current:
        protected |= {current.version, current.previous or ""}
    return protected


def _collect_results(store: IndexStore, alive: set[str], stale_after: timedelta, dry_run: bool) -> list[str]:
    """Delete persisted task results that name only versions that no longer exist. A result that
    names no version at all (or one still alive) is left alone."""
    base = store.path(RESULTS_DIR)
    try:
        infos = store.fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    deleted = []
    for path, info in sorted(infos.items()):
        if info.get("type") == "directory" or (info.get("size") or 0) > _MAX_RESULT_BYTES:
            continue
        if _now() - _stamp(info) < stale_after:
            continue
        refs = _version_refs(store.fs.cat_file(path))
        if refs and not refs & alive:
            deleted.append(path[len(base) + 1:])
            if not dry_run:
                store.fs.rm_file(path)
    return deleted


def _version_refs(data: bytes) -> set[str]:
    """Version ids a result record refers to, read as bytes: a record is never deserialised here
    (an old pickled one is base64 inside JSON; its strings are searched, never loaded)."""
    blobs = [data]
    try:
        record = json.loads(data)
        if isinstance(record, dict) and isinstance(record.get("result"), str):
            blobs.append(base64.b64decode(record["result"], validate=False))
    except (ValueError, TypeError):
        pass
    return {m.decode() for blob in blobs for m in _VERSION_REF.findall(blob)}


def last_activity(store: IndexStore, directory: str, marker: dict[str, Any] | None) -> datetime:
    """The newest of the staging marker's time and any file's modification time under `directory`:
    a build that keeps writing shards is alive however long it runs."""
    times = [datetime.fromisoformat(marker["created_at"])] if marker and "created_at" in marker else []
    try:
        infos = store.fs.find(directory, detail=True).values()
    except FileNotFoundError:
        infos = []
    times += [_stamp(info) for info in infos]
    return max(times) if times else datetime.fromtimestamp(0, UTC)


def _stamp(info: dict[str, Any]) -> datetime:
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(stamp, int | float):
        return datetime.fromtimestamp(stamp, UTC)
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return datetime.fromtimestamp(0, UTC)


def _ls_dirs(store: IndexStore, path: str) -> list[str]:
    try:
        return [e["name"].rstrip("/") for e in store.fs.ls(path, detail=True) if e["type"] == "directory"]
    except FileNotFoundError:
        return []


def _now() -> datetime:
    return datetime.now(UTC)
