"""The version store: versions, the CURRENT pointer, history, pins, retention and the build lock.

Layout under one root URL (local path or s3://bucket/prefix):

    downloads/<wiki>/<dump_date>/...   raw dump files
    versions/<id>/_staging.json        present while a version is being written
    versions/<id>/manifest.json        written LAST: a version exists only if its manifest does
    versions/<id>/manifest.sig         its signature, when the writer holds a key (storage.signing)
    versions/<id>/...                  what a version holds: storage.layout
    CURRENT                            {"version", "previous", "generation", "updated_at"}
    history/<generation>.json          one per promote / rollback, never rewritten
    holds/<generation>.json            one per rollback: what it left, held from automatic promotes (storage.holds)
    pins/<id>                          pinned versions survive gc
    locks/build.json                   one build at a time per store (a lease: storage.lock)
    locks/pointer.json                 a short lease that promote, rollback, pin and gc take
    trained/, prefect-results/         beside versions/: storage.layout

A little under ~500 lines: every move of CURRENT (promote, rollback, the no-op, history repair) and
the reads it depends on stay in one class, so the compare-and-swap rules are read in one place;
leases, retention and rollback holds are their own modules (storage.lock, storage.retention,
storage.holds).
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field, ValidationError

from storage import holds as hold_records
from storage import names
from storage.cache import CacheConfig, FileCache
from storage.errors import Conflict, CorruptManifest, NotFound, Rejected, first_line
from storage.fs import atomic_write, file_digest, is_local, is_temp_name, join, remove_inside, resolve, to_url
from storage.holds import Hold
from storage.layout import BOOKKEEPING_FILES, MANIFEST, MANIFEST_SIGNATURE, STAGING_MARKER, VERSIONS_DIR
from storage.location import Location
from storage.lock import Lease, live_holder
from storage.manifest import Content, HistoryEntry, Manifest, Pointer
from storage.pointer import create_json, delete_json, ignored_conditions, read_json, swap_json
from storage.signing import Signer, TrustedKeys
from storage.verify import check_signature, lineage_manifests, verify_lineage

log = logging.getLogger(__name__)
BUILD_LOCK = ("locks", "build.json")


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class CorruptVersion:
    version: str
    path: str  # URL of the unreadable manifest
    reason: str


class IndexStore:
    """One store root, local or S3, through a single fsspec code path.

    `signer` signs every manifest this object commits; with `trusted_keys`, promote, rollback and
    serving refuse every version not signed by one of them, ancestors included (storage.signing)."""

    def __init__(self, url: str, s3_endpoint_url: str | None = None, cache: CacheConfig | None = None, *,
                 signer: Signer | None = None, trusted_keys: TrustedKeys | None = None) -> None:
        self.s3_endpoint_url = s3_endpoint_url
        self.cache = cache or CacheConfig()  # the local file cache every reader of this store goes through
        self.signer = signer
        self.trusted_keys = trusted_keys
        self.fs, self.root = resolve(url, s3_endpoint_url)
        self.url = to_url(self.fs, self.root)
        # The root, as the steps below the store take it.
        self.location = Location(self.url, s3_endpoint_url, self.cache)
        self._conditional_writes_ok = False

    def __repr__(self) -> str:
        return f"IndexStore({self.url!r})"

    # -- paths ---------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def version_path(self, version_id: str, *parts: str) -> str:
        return self.path(VERSIONS_DIR, names.check_version_id(version_id), *parts)

    def version_url(self, version_id: str, *parts: str) -> str:
        """A URL for a version's files, as people and reports read it."""
        return to_url(self.fs, self.version_path(version_id, *parts))

    def file_cache(self) -> FileCache:
        """This store's local file cache, as the edge configured it (`cache`)."""
        return self.cache.for_store(self.url)

    def at(self, version_id: str, *parts: str) -> Location:
        """A version's files as the steps that read and write them take them (with this store's endpoint)."""
        return Location(self.version_url(version_id, *parts), self.s3_endpoint_url, self.cache)

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
        self.require_conditional_writes()
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
        for version_id in self.version_ids():
            if self.has_version(version_id):
                continue
            marker, _ = read_json(self.fs, self.version_path(version_id, STAGING_MARKER))
            if marker and marker.get("build_key") == build_key:
                found.append(version_id)
        return max(found) if found else None

    def resume_or_begin(self, wiki: str, dump_date: str, build_key: str) -> tuple[str, bool]:
        """The staging version a killed build of the same `build_key` left behind, else a new one; and
        whether it was resumed. Call it holding the build lock: no live writer then owns the half-written
        files (temp names) a killed one left, which are removed (left in place they would be listed in
        the manifest as part of the version)."""
        staged = self.find_staging(build_key)
        if staged is None:
            return self.begin_version(wiki, dump_date, build_key=build_key), False
        for path in self.fs.find(self.version_path(staged)):
            if is_temp_name(path.rstrip("/").rsplit("/", 1)[-1]):
                remove_inside(self.fs, self.root, path, recursive=False)  # never through a link
        return staged, True

    def is_staging(self, version_id: str) -> bool:
        marker = self.version_path(version_id, STAGING_MARKER)
        return self.fs.exists(marker) and not self.has_version(version_id)

    def commit_version(self, manifest: Manifest) -> None:
        """Write the manifest, last: from this moment the version exists. Never overwrites one.

        With a `signer`, its signature goes first, so that a version never exists unsigned."""
        path = self.version_path(manifest.version, MANIFEST)
        if self.fs.exists(path):
            raise Conflict(f"version {manifest.version} already has a manifest; versions are immutable")
        if not self.fs.exists(self.version_path(manifest.version, STAGING_MARKER)):
            # gc removed a staging area it thought abandoned: its files are gone, do not publish it.
            raise NotFound(f"version {manifest.version} is not being staged (begin_version it first)")
        data = manifest.to_json().encode()
        signature = self.version_path(manifest.version, MANIFEST_SIGNATURE)
        if self.signer is not None:
            with atomic_write(self.fs, signature) as f:
                f.write(self.signer.sign(data))
        elif self.fs.exists(signature):  # left by a signing attempt that died: it signs other bytes
            self.fs.rm_file(signature)
        with atomic_write(self.fs, path) as f:
            f.write(data)
        delete_json(self.fs, self.version_path(manifest.version, STAGING_MARKER))

    def has_version(self, version_id: str) -> bool:
        return self.fs.exists(self.version_path(version_id, MANIFEST))

    def manifest_bytes(self, version_id: str) -> bytes:
        """The manifest as stored: what a delta's `SegmentRef.manifest_sha256` pins."""
        try:
            with self.fs.open(self.version_path(version_id, MANIFEST), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"no version {version_id!r} in {self.url}") from None

    def manifest(self, version_id: str, data: bytes | None = None) -> Manifest:
        """The manifest of a version (from `data` when the caller already read and checked its bytes)."""
        path = self.version_path(version_id, MANIFEST)
        if data is None:
            data = self.manifest_bytes(version_id)
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "document"
            raise CorruptManifest(
                f"version {version_id} has a corrupt manifest at {to_url(self.fs, path)}: {where}: {first['msg']}"
            ) from None
        if manifest.version != version_id:
            raise CorruptManifest(f"version {version_id} has a corrupt manifest at {to_url(self.fs, path)}: "
                                  f"it describes version {manifest.version!r}")
        return manifest

    def list_versions(self) -> list[Manifest]:
        """Every visible version with a readable manifest, oldest first (corrupt ones: `scan_versions`)."""
        return self.scan_versions()[0]

    def scan_versions(self) -> tuple[list[Manifest], list[CorruptVersion]]:
        """Every visible version, oldest first, and apart from them those whose manifest is corrupt:
        one bad manifest must not hide (or block gc and rollback of) all the others."""
        manifests, corrupt = [], []
        for version_id in self.version_ids():
            try:
                manifests.append(self.manifest(version_id))
            except NotFound:
                continue  # staging: not a version yet
            except CorruptManifest as exc:
                corrupt.append(CorruptVersion(version_id, self.version_url(version_id, MANIFEST), str(exc)))
        return sorted(manifests, key=lambda m: (m.created_at, m.version)), corrupt

    def latest_ready(self, exclude: str | None = None) -> Manifest | None:
        ready = [m for m in self.list_versions() if m.status == "ready" and m.version != exclude]
        return ready[-1] if ready else None

    def ready_with(self, content: Content) -> Manifest | None:
        """The newest ready version that holds exactly `content` (`Manifest.content`), if any."""
        found = [m for m in self.list_versions() if m.status == "ready" and m.content == content]
        return found[-1] if found else None

    def file_sha256(self, version_id: str, relpath: str) -> str:
        return file_digest(self.fs, self.version_path(version_id, relpath))

    def version_files(self, version_id: str) -> list[str]:
        """Relative paths of a version's data files (not the manifest or the staging marker)."""
        base = self.version_path(version_id)
        found = self.fs.find(base)
        rel = [p[len(base) + 1:] for p in (x.rstrip("/") for x in found) if p.startswith(base + "/")]
        return sorted(r for r in rel if r not in BOOKKEEPING_FILES)

    def checksums(self, version_id: str) -> dict[str, str]:
        return {rel: self.file_sha256(version_id, rel) for rel in self.version_files(version_id)}

    def version_bytes(self, version_id: str) -> int:
        return sum(self.fs.size(self.version_path(version_id, rel)) for rel in self.version_files(version_id))

    def version_ids(self) -> list[str]:
        """Every well-named directory under versions/: committed, staging or abandoned alike."""
        base = self.path(VERSIONS_DIR)
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
    ) -> Move:
        """Point CURRENT at a ready version by compare-and-swap on its generation.

        `expected_generation` is the generation the caller decided on (None: whatever is there
        now). A concurrent promote in between raises `Conflict`; CURRENT is never torn. Promoting
        the version that is already CURRENT changes nothing (and keeps `previous`).
        """
        _, verified = self._loadable(version_id)
        with self.pointer_lock(f"{action} {version_id}"):
            return self._move(version_id, expected_generation, actor, reason, action, verified)

    def rollback(
        self, version_id: str | None = None, *, actor: str | None = None, reason: str | None = None
    ) -> Move:
        """Promote an earlier version; by default the newest ready one older than CURRENT, so that
        rolling back twice goes two versions back, never forward to the one just left.

        Every rollback (CLI, flow, server) comes here, and holds what it left (`storage.holds`): no
        automatic refresh promotes anything while a hold is active, until `release_holds`."""
        _, verified = self._loadable(version_id or self._rollback_target(self.current()))
        with self.pointer_lock(f"rollback {version_id or ''}".strip()):
            current = self.current()
            if version_id is None:
                version_id = self._rollback_target(current)
            if current is not None and current.version == version_id:
                raise Rejected(f"version {version_id} is already CURRENT")
            generation = current.generation if current else 0
            hold = self._hold_of(current, version_id, generation + 1, actor, reason) if current else None
            if hold is not None:
                hold_records.write_pending(self, hold)
            try:
                move = self._move(version_id, generation, actor, reason, "rollback", verified)
            except BaseException:
                if hold is not None:
                    hold_records.discard_pending(self, hold)
                raise
            move.hold = hold
            return move

    def _hold_of(self, current: Pointer, to: str, generation: int, actor: str | None, reason: str | None) -> Hold:
        try:
            left = self.manifest(current.version)
        except (NotFound, CorruptManifest):
            left = None  # rolled back from an unreadable version: held all the same, content unknown
        return Hold.of(current.version, left, generation=generation, to=to, actor=actor or default_actor(),
                       reason=reason, at=_now())

    def _rollback_target(self, current: Pointer | None) -> str:
        if current is None:
            raise NotFound("nothing to roll back to: there is no CURRENT version yet")
        try:
            here = self.manifest(current.version)
            cutoff = (here.created_at, here.version)
        except (NotFound, CorruptManifest):
            cutoff = (current.updated_at, current.version)
        older = [m for m in self.list_versions()
                 if m.status == "ready" and m.version != current.version and (m.created_at, m.version) < cutoff]
        if not older:
            raise NotFound(f"nothing to roll back to: CURRENT {current.version} has no previous ready version "
                           "older than it")
        return older[-1].version

    def _loadable(self, version_id: str, verified: str | None = None) -> tuple[Manifest, str]:
        """The manifest of a version CURRENT may name, and the sha256 of its bytes: for a ready version,
        every file of every segment it serves checked against the manifest naming it (`verify_lineage`),
        the checks serving makes when it opens it, so that CURRENT never names what a new server or
        `ragindex query` cannot load. A rejected version is returned as it is (`_move` refuses it with
        its own reason).

        A file is hashed only when it changed since the cache last found it good (`FileCache.confirm`):
        a live micro-delta's promote costs its own files and a stat (on S3, a HEAD) of each ancestor's
        file, not a read of the whole lineage. It is done before the pointer lock is taken, so that the
        lock stays short for gc and other moves; under the lock the call is repeated
        with `verified` (the manifest's sha256 then): an unchanged manifest has its segments' manifests
        checked again (cheap: pinned by sha256), a changed one is verified in full again."""
        data = self.manifest_bytes(version_id)
        check_signature(self, version_id, data)  # where keys are trusted: signed by one, these very bytes
        manifest = self.manifest(version_id, data)
        digest = hashlib.sha256(data).hexdigest()
        if manifest.status == "ready":
            if digest == verified:
                lineage_manifests(self, manifest)
            else:
                verify_lineage(self, manifest, self.file_cache().confirm)
        return manifest, digest

    def _move(
        self, version_id: str, expected_generation: int | None, actor: str | None, reason: str | None, action: str,
        verified: str | None = None,
    ) -> Move:
        manifest, _ = self._loadable(version_id, verified)
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
        if seen is not None and seen.version == version_id:
            return Move(**seen.model_dump(), moved=False)
        if seen is not None:
            self._repair_history(seen)
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
        try:
            create_json(self.fs, self._history_path(new.generation), entry.model_dump(mode="json"))
        except Exception as exc:
            # CURRENT did move: saying "failed" now would make the caller retry or roll back blindly.
            log.warning("CURRENT moved to %s (generation %d) but its history entry was not written (%s); "
                        "the next promote or rollback writes it", version_id, new.generation, first_line(exc))
            return Move(**new.model_dump(), history_written=False)
        return Move(**new.model_dump())

    def _history_path(self, generation: int) -> str:
        return self.path("history", f"{generation:08d}.json")

    def _repair_history(self, seen: Pointer) -> None:
        """Write the history entry of the move that made `seen`, if that move could not."""
        path = self._history_path(seen.generation)
        try:
            if self.fs.exists(path):
                return
            entry = HistoryEntry(
                generation=seen.generation, action="promote", from_version=seen.previous, to_version=seen.version,
                actor="unknown", at=seen.updated_at,
                reason="reconstructed from CURRENT: the history write of this move had failed",
            )
            create_json(self.fs, path, entry.model_dump(mode="json"))
        except Exception as exc:
            log.warning("could not repair history entry %d: %s", seen.generation, first_line(exc))

    def pointer_lock(self, what: str) -> Lease:
        """Serialises moves of CURRENT with gc's deletions, so that gc never deletes a version that a
        concurrent promote is about to name (held for one move, or one deletion: short)."""
        self.require_conditional_writes()
        return Lease(self.fs, self.path("locks", "pointer.json"), f"{what} by {default_actor()}",
                     ttl=timedelta(seconds=30), wait=30.0, where=f"CURRENT of {self.url}",
                     holder="another promote, rollback or gc")

    def history_entry(self, generation: int) -> HistoryEntry | None:
        data, _ = read_json(self.fs, self._history_path(generation))
        return HistoryEntry.model_validate(data) if data else None

    # -- rollback holds ------------------------------------------------------------------------

    def holds(self, include_released: bool = False) -> list[Hold]:
        """The active rollback holds (with `include_released`, released ones too), oldest first."""
        return [h for h in hold_records.read_holds(self) if include_released or h.active]

    def release_holds(self, actor: str | None = None, reason: str | None = None) -> list[Hold]:
        """Release every active hold (`ragindex resume`): automatic refreshes may promote again."""
        return hold_records.release(self, actor or default_actor(), reason, _now())

    def history(self) -> list[HistoryEntry]:
        base = self.path("history")
        try:
            files = sorted(p for p in self.fs.ls(base, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        entries = []
        for p in files:
            try:
                with self.fs.open(p, "rb") as f:
                    entries.append(HistoryEntry.model_validate_json(f.read()))
            except ValueError as exc:  # one bad entry must not hide the others
                log.warning("skipping unreadable history entry %s: %s", p, first_line(exc))
        return sorted(entries, key=lambda e: e.generation)

    # -- pins and retention --------------------------------------------------------------------

    def pin(self, version_id: str) -> None:
        with self.pointer_lock(f"pin {version_id}"):  # so that gc cannot delete it meanwhile
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

    # -- one build at a time -------------------------------------------------------------------

    @contextmanager
    def build_lock(self, owner: str, ttl: timedelta = timedelta(minutes=2)) -> Iterator[Lease]:
        """Hold the store's build lock, or raise `Conflict` naming who holds it.

        The lock is a lease kept alive by a heartbeat; one whose holder stopped renewing it for
        `ttl` (a build that died, wherever it ran) is broken by compare-and-swap.
        """
        self.require_conditional_writes()
        with Lease(self.fs, self.path(*BUILD_LOCK), owner, ttl=ttl, where=self.url) as lease:
            yield lease

    def building(self) -> str | None:
        """Who holds the build lock right now with a live heartbeat (None: no build is running)."""
        return live_holder(self.fs, self.path(*BUILD_LOCK))

    # -- the backend must honour conditional writes --------------------------------------------

    def require_conditional_writes(self) -> None:
        """Refuse an S3-compatible endpoint that ignores If-None-Match / If-Match: there every
        compare-and-swap would silently succeed and concurrent updates would be lost.
        Probed once per store object, with writes that must fail, on a key of its own."""
        if self._conditional_writes_ok or is_local(self.fs):
            return
        ignored = ignored_conditions(self.fs, self.path("locks", f"cas-probe-{uuid.uuid4().hex}.json"))
        if ignored:
            raise Rejected(
                f"the S3 endpoint of {self.url} ignores {' and '.join(ignored)} (a conditional write that "
                "must fail succeeded): refusing it as a store, concurrent updates of CURRENT and locks would be lost"
            )
        self._conditional_writes_ok = True


class Move(Pointer):
    """What promote and rollback return: the new CURRENT and what happened on the way."""

    moved: bool = Field(True, exclude=True)  # False: the version was already CURRENT, nothing changed
    history_written: bool = Field(True, exclude=True)  # False: CURRENT moved but its history entry did not land
    hold: Hold | None = Field(None, exclude=True)  # a rollback's: what it left and now holds


def _now() -> datetime:
    return datetime.now(UTC)
