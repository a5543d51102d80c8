"""Retention: what `gc` deletes and what it must never delete.

Versions beyond the newest `keep` ready ones (rejected versions and staging areas never count
toward `keep`) go, unless CURRENT, previous or pinned, or a segment of a version that stays: a
delta version serves its ancestors' rows from their directories, so every version a kept one names
in `segments` (transitively) stays too. The protected set (with its segments, and every version
committed since gc's scan) is re-read under the pointer lock right before each version's manifest
is removed, so a promote or rollback running at the same time can never leave CURRENT naming a
deleted version or a deleted segment; deltas go before the ancestors they share rows with. Corrupt
manifests go too (nothing can serve them), unless a kept version names them as a segment. Never on
doubt: a corrupt manifest is read as plain JSON for its segments, and when a kept one's cannot be
read at all, no version (and no download) is deleted. Then staging areas idle for `stale_after`,
downloads no kept version uses (its dump, its lineage's base dump and applied adds-changes days),
and Prefect results that refer only to versions that are gone.
"""

from __future__ import annotations

import base64
import heapq
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.errors import CorruptManifest, NotFound, Rejected
from storage.fs import link_below, remove_inside
from storage.layout import MANIFEST, RESULTS_DIR, STAGING_MARKER, VERSIONS_DIR
from storage.manifest import Manifest
from storage.pointer import read_json
from storage.store import IndexStore

_VERSION_REF = re.compile(VERSIONS_DIR.encode() + rb"/([a-z0-9._-]{1,200})/")
_MAX_RESULT_BYTES = 1 << 20  # result records are small; a bigger file is not one of ours


@dataclass
class GcReport:
    deleted_versions: list[str] = field(default_factory=list)
    deleted_staging: list[str] = field(default_factory=list)
    deleted_downloads: list[str] = field(default_factory=list)
    deleted_corrupt: list[str] = field(default_factory=list)
    deleted_results: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    # Of `kept`: versions outside the keep window and not protected, kept only because a kept delta
    # version serves their rows (they are in its `segments`) ...
    kept_as_segment: list[str] = field(default_factory=list)
    # ... and those kept only because a kept version's manifest is unreadable, so what it shares is unknown.
    kept_in_doubt: list[str] = field(default_factory=list)
    # Who held the build lock, alive, when gc would have deleted staging areas or downloads: none was deleted.
    kept_for_build: str | None = None
    # Paths below the root that are symbolic links, which gc left alone (never deleting through them).
    skipped_links: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Needs:
    """What one version needs besides its own directory. None: unknown (its manifest cannot say)."""

    segments: frozenset[str] | None
    downloads: frozenset[tuple[str, str]] | None


_UNKNOWN = _Needs(None, None)


def gc(store: IndexStore, keep: int, stale_after: timedelta = timedelta(hours=6), dry_run: bool = False) -> GcReport:
    """Delete versions beyond the newest `keep` ready ones that are not CURRENT, previous or
    pinned, corrupt manifests, staging areas with no activity for `stale_after` (left by crashed
    builds), downloads no kept or in-progress version uses, and task results of gone versions."""
    if keep < 1:
        raise Rejected("gc --keep must be at least 1")
    report = GcReport()
    versions, corrupt = store.scan_versions()
    corrupt_ids = {c.version for c in corrupt}
    needs = {m.version: _needs_of(m) for m in versions}
    needs.update({c.version: _read_needs(store, c.version) for c in corrupt})
    newest = {m.version for m in [m for m in versions if m.status == "ready"][-keep:]}
    roots = _protected_roots(store)
    wanted, _ = _closure(newest | roots, needs)
    doomed = [v for v in [m.version for m in versions] + [c.version for c in corrupt] if v not in wanted]
    gone: set[str] = set()
    pending = set(doomed)
    for version_id in _dependents_first(doomed, needs):
        pending.discard(version_id)
        if _left_alone(store, store.version_path(version_id, MANIFEST), report):
            continue

        def keep_it(v: str = version_id) -> bool:
            return _protected(store, needs).covers(v) or _needed_by_present(v, needs, gone, pending)

        if _remove_manifest_unless(store, version_id, dry_run, MANIFEST, keep_it):
            gone.add(version_id)
            if not dry_run:
                _remove(store, store.version_path(version_id), report)
    report.deleted_versions = [v for v in doomed if v in gone and v not in corrupt_ids]
    report.deleted_corrupt = [v for v in doomed if v in gone and v in corrupt_ids]
    kept = [m.version for m in versions if m.version not in gone] + [v for v in sorted(corrupt_ids) if v not in gone]
    report.kept = kept
    report.kept_as_segment, report.kept_in_doubt = _why_kept(kept, newest | roots, needs)

    kept_needs = [needs[v] for v in kept]
    keep_all_downloads = any(n.downloads is None for n in kept_needs)
    used = {d for n in kept_needs for d in n.downloads or ()}
    alive = set(kept)
    visible = {m.version for m in versions} | corrupt_ids
    for version_id in store.version_ids():
        if version_id in visible:
            continue
        if store.has_version(version_id):  # committed since the scan: a version, not abandoned staging
            alive.add(version_id)
            late = _read_needs(store, version_id)
            keep_all_downloads |= late.downloads is None
            used |= late.downloads or set()
            continue
        marker, _ = read_json(store.fs, store.version_path(version_id, STAGING_MARKER))
        if _now() - last_activity(store, store.version_path(version_id), marker) < stale_after \
                or _build_running(store, report) or _left_alone(store, store.version_path(version_id), report):
            alive.add(version_id)
            if marker:
                used.add((marker.get("wiki"), marker.get("dump_date")))
            continue
        report.deleted_staging.append(version_id)
        if not dry_run:
            _remove(store, store.version_path(version_id), report)
    for wiki_dir in [] if keep_all_downloads else _ls_dirs(store, store.path("downloads")):
        if _left_alone(store, wiki_dir, report):
            continue
        for date_dir in _ls_dirs(store, wiki_dir):
            wiki, date = wiki_dir.rsplit("/", 1)[-1], date_dir.rsplit("/", 1)[-1]
            if (wiki, date) in used or _now() - last_activity(store, date_dir, None) < stale_after \
                    or _build_running(store, report) or _left_alone(store, date_dir, report):
                continue
            report.deleted_downloads.append(f"{wiki}/{date}")
            if not dry_run:
                _remove(store, date_dir, report)
    report.deleted_results = _collect_results(store, alive, stale_after, dry_run)
    return report


def _remove_manifest_unless(store: IndexStore, version_id: str, dry_run: bool, manifest: str,
                            keep_it: Callable[[], bool]) -> bool:
    """Under the pointer lock: True (manifest removed, unless a dry run) when `keep_it()` says no
    right now (`version_id` is not CURRENT, previous, pinned, nor a segment of one of them or of a
    version still present). Once the manifest is gone no promote can pick it up, so the data can be
    deleted after the lock is released."""
    if dry_run:
        return not keep_it()
    with store.pointer_lock(f"gc {version_id}"):
        if keep_it():
            return False
        remove_inside(store.fs, store.root, store.version_path(version_id, manifest), recursive=False)
    return True


@dataclass(frozen=True)
class _Protection:
    ids: frozenset[str]
    everything: bool  # a protected version's manifest cannot say which versions it shares rows with

    def covers(self, version_id: str) -> bool:
        return self.everything or version_id in self.ids


def _protected_roots(store: IndexStore) -> set[str]:
    """CURRENT, previous and the pinned versions."""
    protected = set(store.pinned())
    current = store.current()
    if current:
        protected |= {current.version, current.previous or ""}
    return protected - {""}


def _protected(store: IndexStore, known: dict[str, _Needs] | None = None) -> _Protection:
    """What nothing may delete right now: CURRENT, previous, pinned, every version committed since
    `known` (the scan gc planned from) was taken, and, transitively, the segments of all of them."""
    known = dict(known or {})
    roots = _protected_roots(store)
    for version_id in store.version_ids():
        if version_id not in known and store.has_version(version_id):
            roots.add(version_id)  # appeared after the scan: a new version, maybe a delta on a doomed one
    ids, everything = _closure(roots, known, store)
    return _Protection(frozenset(ids), everything)


def _closure(roots: set[str], needs: dict[str, _Needs], store: IndexStore | None = None) -> tuple[set[str], bool]:
    """`roots` and every version their segments name, transitively; and whether some version on the
    way has segments nobody can read (then everything must be treated as needed). With `store`,
    versions missing from `needs` are read (and added to it)."""
    found, todo, unknown = set(), list(roots), False
    while todo:
        version_id = todo.pop()
        if version_id in found:
            continue
        found.add(version_id)
        if version_id not in needs and store is not None:
            needs[version_id] = _read_needs(store, version_id)
        segments = needs.get(version_id, _Needs(frozenset(), frozenset())).segments
        if segments is None:
            unknown = True
            continue
        todo += [s for s in segments if s not in found]
    return (found | set(needs) if unknown else found), unknown


def _needed_by_present(version_id: str, needs: dict[str, _Needs], gone: set[str], pending: set[str]) -> bool:
    """True when a version still present names `version_id` as a segment, or might: its segments are
    unreadable and it is not itself about to be deleted (`pending`: doomed, not yet reached; a corrupt
    manifest can be neither promoted nor pinned, nor built on, so it cannot become needed meanwhile)."""
    for v, n in needs.items():
        if v == version_id or v in gone:
            continue
        if version_id in (n.segments or ()) or (n.segments is None and v not in pending):
            return True
    return False


def _dependents_first(doomed: list[str], needs: dict[str, _Needs]) -> list[str]:
    """`doomed` in its order, except that a delta comes before the versions it shares rows with, so
    that no present version ever names a deleted one, and a version whose segments are unknown comes
    as early as that allows (whatever it names can only go after it). A cycle (only a damaged store
    has one) goes last, where `_needed_by_present` keeps its members."""
    index = {v: i for i, v in enumerate(doomed)}
    waiting = dict.fromkeys(doomed, 0)  # per version: its doomed dependents not yet ordered
    for d in doomed:
        for s in needs[d].segments or ():
            if s in waiting and s != d:
                waiting[s] += 1

    def key(v: str) -> tuple[int, int]:
        return (0 if needs[v].segments is None else 1, index[v])

    ready = [key(v) for v in doomed if waiting[v] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        v = doomed[heapq.heappop(ready)[1]]
        order.append(v)
        for s in needs[v].segments or ():
            if s in waiting and s != v:
                waiting[s] -= 1
                if waiting[s] == 0:
                    heapq.heappush(ready, key(s))
    placed = set(order)
    return order + [v for v in doomed if v not in placed]


def _why_kept(kept: list[str], wanted: set[str], needs: dict[str, _Needs]) -> tuple[list[str], list[str]]:
    """Of the kept versions not kept for their own sake (`wanted`): those a kept version names as a
    segment, and those kept because a kept version's segments cannot be read."""
    named = {s for v in kept for s in needs[v].segments or () if s != v}
    doubt = any(needs[v].segments is None for v in kept)
    as_segment = [v for v in kept if v not in wanted and v in named]
    in_doubt = [v for v in kept if v not in wanted and v not in named and doubt]
    return as_segment, in_doubt


def _needs_of(m: Manifest) -> _Needs:
    """A readable manifest's needs: its segments, and the downloads its lineage was built from (the base
    dump, every applied adds-changes day, and its own source date)."""
    wiki = m.source.wiki
    dates = {m.source.dump_date}
    if m.lineage is not None:
        dates |= {m.lineage.base_dump} | {d.date for d in m.lineage.days}
    return _Needs(frozenset(s.version for s in m.segments), frozenset((wiki, d) for d in dates))


def _read_needs(store: IndexStore, version_id: str) -> _Needs:
    """The needs of a version read from the store. A version without a manifest needs nothing (it
    serves nothing); a corrupt manifest is read as plain JSON for what it still says, else unknown."""
    try:
        data = store.manifest_bytes(version_id)
    except NotFound:
        return _Needs(frozenset(), frozenset())
    try:
        return _needs_of(store.manifest(version_id, data))
    except CorruptManifest:
        return _raw_needs(data)


def _raw_needs(data: bytes) -> _Needs:
    """What a manifest that does not validate still says about its segments and downloads. A key that
    is absent means "none" only in a document that is otherwise recognisably a manifest (manifests
    written before delta versions existed have neither `segments` nor `lineage`)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return _UNKNOWN
    if not isinstance(obj, dict) or "schema_version" not in obj:
        return _UNKNOWN
    segments: frozenset[str] | None = None
    raw_segments = obj.get("segments", [])
    if isinstance(raw_segments, list) and all(
            isinstance(s, dict) and isinstance(s.get("version"), str) for s in raw_segments):
        segments = frozenset(s["version"] for s in raw_segments)
    return _Needs(segments, _raw_downloads(obj))


def _raw_downloads(obj: dict[str, Any]) -> frozenset[tuple[str, str]] | None:
    source, lineage = obj.get("source"), obj.get("lineage")
    if not isinstance(source, dict) or not isinstance(source.get("wiki"), str) \
            or not isinstance(source.get("dump_date"), str):
        return None
    dates = [source["dump_date"]]
    if lineage is not None:
        if not isinstance(lineage, dict) or not isinstance(lineage.get("base_dump"), str) \
                or not isinstance(lineage.get("days", []), list):
            return None
        days = lineage.get("days", [])
        if not all(isinstance(d, dict) and isinstance(d.get("date"), str) for d in days):
            return None
        dates += [lineage["base_dump"], *(d["date"] for d in days)]
    return frozenset((source["wiki"], d) for d in dates)


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
        if link_below(store.fs, store.root, path):
            continue  # read through a link it may be anyone's file: neither read nor deleted
        refs = _version_refs(store.fs.cat_file(path))
        if refs and not refs & alive:
            deleted.append(path[len(base) + 1:])
            if not dry_run:
                remove_inside(store.fs, store.root, path, recursive=False)
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


def _build_running(store: IndexStore, report: GcReport) -> bool:
    """Whether a build holds the build lock with a live heartbeat, read again before each deletion it could
    hurt: which staging area it resumes and which downloads it reads, its lease does not say, and a long
    embedding writes nothing for hours, so while it runs no staging area and no download is judged by age."""
    holder = store.building()
    if holder is not None:
        report.kept_for_build = holder
    return holder is not None


def _left_alone(store: IndexStore, path: str, report: GcReport) -> bool:
    """True (and reported) when `path` lies through a symbolic link below the store's root: gc never
    deletes through one (a version directory linked to a backup on another disk is the backup's)."""
    link = link_below(store.fs, store.root, path)
    if link is None:
        return False
    where = link[len(store.root) + 1:] if link.startswith(store.root + "/") else link
    if where not in report.skipped_links:
        report.skipped_links.append(where)
    return True


def _remove(store: IndexStore, path: str, report: GcReport) -> None:
    """Delete a tree of the store, never through a link (one made since `_left_alone` looked is reported)."""
    link = remove_inside(store.fs, store.root, path)
    if link is not None:
        _left_alone(store, link, report)


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
    """The directories in `path`, and the symbolic links (which `_left_alone` reports and never follows)."""
    try:
        return [e["name"].rstrip("/") for e in store.fs.ls(path, detail=True)
                if e["type"] == "directory" or e.get("islink")]
    except FileNotFoundError:
        return []


def _now() -> datetime:
    return datetime.now(UTC)
