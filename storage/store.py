"""The version store: versions, the CURRENT pointer, history, pins, retention and the build lock.

Layout under one root URL (local path or s3://bucket/prefix):

    downloads/<wiki>/<dump_date>/...   raw dump files
    versions/<id>/_staging.json        present while a version is being written
    versions/<id>/manifest.json        written LAST: a version exists only if its manifest does
    versions/<id>/...                  what a version holds: storage.layout
    CURRENT                            {"version", "previous", "generation", "updated_at"}
    history/<generation>.json          one per promote / rollback, never rewritten
    pins/<id>                          pinned versions survive gc
    locks/build.json                   one build at a time per store
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from storage import names
from storage.errors import Conflict, NotFound, Rejected
from storage.fs import atomic_write, file_digest, join, resolve, to_url
from storage.layout import MANIFEST, STAGING_MARKER
from storage.manifest import HistoryEntry, Manifest, Pointer
from storage.pointer import create_json, delete_json, read_json, swap_json


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class GcReport:
    deleted_versions: list[str] = field(default_factory=list)
    deleted_staging: list[str] = field(default_factory=list)
    deleted_downloads: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


class IndexStore:
    """One store root, local or S3, through a single fsspec code path."""

    def __init__(self, url: str, s3_endpoint_url: str | None = None) -> None:
        self.s3_endpoint_url = s3_endpoint_url
        self.fs, self.root = resolve(url, s3_endpoint_url)
        self.url = to_url(self.fs, self.root)

    def __repr__(self) -> str:
        return f"IndexStore({self.url!r})"

    # -- paths ---------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def version_path(self, version_id: str, *parts: str) -> str:
        return self.path("versions", names.check_version_id(version_id), *parts)

    def version_url(self, version_id: str, *parts: str) -> str:
        """A URL for a version's files that tasks can hand to each other and `resolve`."""
        return to_url(self.fs, self.version_path(version_id, *parts))

    def downloads_path(self, wiki: str, dump_date: str, *parts: str) -> str:
        return self.path("downloads", names.check_wiki(wiki), names.check_dump_date(dump_date), *parts)

    # -- versions ------------------------------------------------------------------------------

    def begin_version(
        self, wiki: str, dump_date: str, now: datetime | None = None, build_key: str | None = None
    ) -> str:
        """Reserve a new version id and mark it as staging (invisible until `commit_version`).

        Ids have one-second resolution; when two builds start in the same second the later one
        takes the next free second, so ids stay unique and ordered. `build_key` (what the build is
        made from) lets a re-run of a crashed build find this staging area with `find_staging`.
        """
        names.check_wiki(wiki)
        names.check_dump_date(dump_date)
        start = now or _now()
        record = {
            "created_at": _now().isoformat(), "owner": default_actor(), "wiki": wiki, "dump_date": dump_date,
            "build_key": build_key,
        }
        for step in range(120):
            version_id = names.new_version_id(wiki, dump_date, start + timedelta(seconds=step))
            if self.fs.exists(self.version_path(version_id)):
                continue  # a committed (or crashed) version already owns this id
            try:
                create_json(self.fs, self.version_path(version_id, STAGING_MARKER), record)
            except Conflict:
                continue
            return version_id
        raise Conflict(f"could not reserve a version id for {wiki}/{dump_date}: too many builds at once")

    def find_staging(self, build_key: str) -> str | None:
        """The newest staging version begun with `build_key` (a crashed build to resume), if any."""
        found = []
        for version_id in self._version_dirs():
            if self.has_version(version_id):
                continue
            marker, _ = read_json(self.fs, self.version_path(version_id, STAGING_MARKER))
            if marker and marker.get("build_key") == build_key:
                found.append(version_id)
        return max(found) if found else None

    def is_staging(self, version_id: str) -> bool:
        marker = self.version_path(version_id, STAGING_MARKER)
        return self.fs.exists(marker) and not self.has_version(version_id)

    def commit_version(self, manifest: Manifest) -> None:
        """Write the manifest, last: from this moment the version exists. Never overwrites one."""
        path = self.version_path(manifest.version, MANIFEST)
        if self.fs.exists(path):
            raise Conflict(f"version {manifest.version} already has a manifest; versions are immutable")
        if not self.fs.exists(self.version_path(manifest.version, STAGING_MARKER)):
            # gc removed a staging area it thought abandoned: its files are gone, do not publish it.
            raise NotFound(f"version {manifest.version} is not being staged (begin_version it first)")
        with atomic_write(self.fs, path) as f:
            f.write(manifest.to_json().encode())
        delete_json(self.fs, self.version_path(manifest.version, STAGING_MARKER))

    def has_version(self, version_id: str) -> bool:
        return self.fs.exists(self.version_path(version_id, MANIFEST))

    def manifest(self, version_id: str) -> Manifest:
        path = self.version_path(version_id, MANIFEST)
        try:
            with self.fs.open(path, "rb") as f:
                return Manifest.model_validate_json(f.read())
        except FileNotFoundError:
            raise NotFound(f"no version {version_id!r} in {self.url}") from None

    def list_versions(self) -> list[Manifest]:
        """Every visible version (one with a manifest), oldest first."""
        manifests = []
        for version_id in self._version_dirs():
            try:
                manifests.append(self.manifest(version_id))
            except NotFound:
                continue  # staging: not a version yet
        return sorted(manifests, key=lambda m: (m.created_at, m.version))

    def latest_ready(self, exclude: str | None = None) -> Manifest | None:
        ready = [m for m in self.list_versions() if m.status == "ready" and m.version != exclude]
        return ready[-1] if ready else None

    def file_sha256(self, version_id: str, relpath: str) -> str:
        return file_digest(self.fs, self.version_path(version_id, relpath))

    def version_files(self, version_id: str) -> list[str]:
        """Relative paths of a version's data files (not the manifest or the staging marker)."""
        base = self.version_path(version_id)
        found = self.fs.find(base)
        rel = [p[len(base) + 1:] for p in (x.rstrip("/") for x in found) if p.startswith(base + "/")]
        return sorted(r for r in rel if r not in (MANIFEST, STAGING_MARKER))

    def checksums(self, version_id: str) -> dict[str, str]:
        return {rel: self.file_sha256(version_id, rel) for rel in self.version_files(version_id)}

    def version_bytes(self, version_id: str) -> int:
        return sum(self.fs.size(self.version_path(version_id, rel)) for rel in self.version_files(version_id))

    def _version_dirs(self) -> list[str]:
        base = self.path("versions")
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        ids = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            try:
                ids.append(names.check_version_id(name))
            except names.InvalidName:
                continue
        return ids

    # -- CURRENT, promote, rollback ------------------------------------------------------------

    def current(self) -> Pointer | None:
        data, _ = read_json(self.fs, self.path("CURRENT"))
        return Pointer.model_validate(data) if data else None

    def promote(
        self,
        version_id: str,
        *,
        expected_generation: int | None = None,
        actor: str | None = None,
        reason: str | None = None,
        action: str = "promote",
    ) -> Pointer:
        """Point CURRENT at a ready version by compare-and-swap on its generation.

        `expected_generation` is the generation the caller decided on (None: whatever is there
        now). A concurrent promote in between raises `Conflict`; CURRENT is never torn.
        """
        manifest = self.manifest(version_id)
        if manifest.status == "ready":  # a rejected version is refused below, with its own reason
            from storage.verify import verify_version

            verify_version(self, version_id, manifest=manifest)
        if manifest.status != "ready":
            why = manifest.validation.reason if manifest.validation else "status is " + manifest.status
            raise Rejected(f"version {version_id} is {manifest.status} and cannot be promoted: {why}")
        path = self.path("CURRENT")
        data, token = read_json(self.fs, path)
        seen = Pointer.model_validate(data) if data else None
        seen_gen = seen.generation if seen else 0
        if expected_generation is not None and expected_generation != seen_gen:
            raise Conflict(
                f"CURRENT is at generation {seen_gen}, not {expected_generation}: someone else moved it"
            )
        new = Pointer(
            version=version_id,
            previous=seen.version if seen else None,
            generation=seen_gen + 1,
            updated_at=_now(),
        )

        def unchanged(current: dict[str, Any] | None) -> None:
            generation = current.get("generation", 0) if current else 0
            if generation != seen_gen:
                raise Conflict(f"CURRENT moved to generation {generation} while promoting {version_id}")

        swap_json(self.fs, path, unchanged, new.model_dump(mode="json"), token)
        entry = HistoryEntry(
            generation=new.generation,
            action=action,  # type: ignore[arg-type]
            from_version=new.previous,
            to_version=version_id,
            actor=actor or default_actor(),
            reason=reason,
            at=new.updated_at,
        )
        history_path = self.path("history", f"{new.generation:08d}.json")
        create_json(self.fs, history_path, entry.model_dump(mode="json"))
        return new

    def rollback(
        self, version_id: str | None = None, *, actor: str | None = None, reason: str | None = None
    ) -> Pointer:
        """Promote an earlier version; by default the one CURRENT names as previous."""
        current = self.current()
        if version_id is None:
            if current is None or current.previous is None:
                raise NotFound("nothing to roll back to: CURRENT has no previous version")
            version_id = current.previous
        if current is not None and current.version == version_id:
            raise Rejected(f"version {version_id} is already CURRENT")
        return self.promote(
            version_id,
            expected_generation=current.generation if current else 0,
            actor=actor,
            reason=reason,
            action="rollback",
        )

    def history(self) -> list[HistoryEntry]:
        base = self.path("history")
        try:
            files = sorted(p for p in self.fs.ls(base, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        entries = []
        for p in files:
            with self.fs.open(p, "rb") as f:
                entries.append(HistoryEntry.model_validate_json(f.read()))
        return sorted(entries, key=lambda e: e.generation)

    # -- pins and retention --------------------------------------------------------------------

    def pin(self, version_id: str) -> None:
        self.manifest(version_id)  # must exist
        with atomic_write(self.fs, self.path("pins", names.check_version_id(version_id))) as f:
            f.write(_now().isoformat().encode())

    def unpin(self, version_id: str) -> None:
        path = self.path("pins", names.check_version_id(version_id))
        if not self.fs.exists(path):
            raise NotFound(f"version {version_id} is not pinned")
        self.fs.rm_file(path)

    def pinned(self) -> set[str]:
        try:
            entries = self.fs.ls(self.path("pins"), detail=False)
        except FileNotFoundError:
            return set()
        found = {p.rstrip("/").rsplit("/", 1)[-1] for p in entries}
        return {n for n in found if not n.startswith(".")}  # skip atomic_write temp files

    def gc(self, keep: int, stale_after: timedelta = timedelta(hours=6), dry_run: bool = False) -> GcReport:
        """Delete versions beyond the newest `keep` that are not CURRENT, previous or pinned,
        staging areas with no activity for `stale_after` (left by crashed builds), and downloads
        that no kept or in-progress version uses and that nobody touched for `stale_after`."""
        if keep < 1:
            raise Rejected("gc --keep must be at least 1")
        report = GcReport()
        versions = self.list_versions()
        current = self.current()
        protected = set(self.pinned())
        if current:
            protected |= {current.version, current.previous or ""}
        newest = {m.version for m in versions[-keep:]}
        kept = [m for m in versions if m.version in newest or m.version in protected]
        report.kept = [m.version for m in kept]
        for m in versions:
            if m.version not in report.kept:
                report.deleted_versions.append(m.version)
                if not dry_run:
                    # The manifest goes first so that a crash half-way leaves staging, not a broken version.
                    self.fs.rm_file(self.version_path(m.version, MANIFEST))
                    self.fs.rm(self.version_path(m.version), recursive=True)
        used = {(m.source.wiki, m.source.dump_date) for m in kept}
        visible = {m.version for m in versions}
        for version_id in self._version_dirs():
            if version_id in visible:
                continue
            marker, _ = read_json(self.fs, self.version_path(version_id, STAGING_MARKER))
            if _now() - self._last_activity(self.version_path(version_id), marker) < stale_after:
                if marker:
                    used.add((marker.get("wiki"), marker.get("dump_date")))
                continue
            report.deleted_staging.append(version_id)
            if not dry_run:
                self.fs.rm(self.version_path(version_id), recursive=True)
        for wiki_dir in self._ls_dirs(self.path("downloads")):
            for date_dir in self._ls_dirs(wiki_dir):
                wiki, date = wiki_dir.rsplit("/", 1)[-1], date_dir.rsplit("/", 1)[-1]
                if (wiki, date) in used or _now() - self._last_activity(date_dir, None) < stale_after:
                    continue
                report.deleted_downloads.append(f"{wiki}/{date}")
                if not dry_run:
                    self.fs.rm(date_dir, recursive=True)
        return report

    def _last_activity(self, directory: str, marker: dict[str, Any] | None) -> datetime:
        """The newest of the staging marker's time and any file's modification time under `directory`:
        a build that keeps writing shards is alive however long it runs."""
        times = [datetime.fromisoformat(marker["created_at"])] if marker and "created_at" in marker else []
        try:
            infos = self.fs.find(directory, detail=True).values()
        except FileNotFoundError:
            infos = []
        for info in infos:
            stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            if isinstance(stamp, int | float):
                times.append(datetime.fromtimestamp(stamp, UTC))
            elif isinstance(stamp, datetime):
                times.append(stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC))
        return max(times) if times else datetime.fromtimestamp(0, UTC)

    def _ls_dirs(self, path: str) -> list[str]:
        try:
            return [e["name"].rstrip("/") for e in self.fs.ls(path, detail=True) if e["type"] == "directory"]
        except FileNotFoundError:
            return []

    # -- one build at a time -------------------------------------------------------------------

    @contextmanager
    def build_lock(self, owner: str, stale_after: timedelta = timedelta(hours=12)) -> Iterator[None]:
        """Hold the store's build lock, or raise `Conflict` naming who holds it.

        A lock older than `stale_after`, or taken by a process on this host that no longer
        exists, belongs to a build that died and is broken.
        """
        path = self.path("locks", "build.json")
        held, _ = read_json(self.fs, path)
        if held and (_now() - datetime.fromisoformat(held["since"]) >= stale_after or _owner_is_dead(held)):
            delete_json(self.fs, path)
        record = {
            "owner": owner, "since": _now().isoformat(), "pid": os.getpid(), "host": socket.gethostname()
        }
        try:
            create_json(self.fs, path, record)
        except Conflict:
            held, _ = read_json(self.fs, path)
            who = f"{held.get('owner')} since {held.get('since')}" if held else "another build"
            raise Conflict(f"another build holds the lock on {self.url}: {who}") from None
        try:
            yield
        finally:
            delete_json(self.fs, path)

    def _build_lock_held(self) -> bool:
        data, _ = read_json(self.fs, self.path("locks", "build.json"))
        return data is not None


def _now() -> datetime:
    return datetime.now(UTC)


def _owner_is_dead(lock: dict[str, Any]) -> bool:
    """True only when the lock names a process on this host that is gone (a crashed build)."""
    if lock.get("host") != socket.gethostname() or not isinstance(lock.get("pid"), int):
        return False
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
