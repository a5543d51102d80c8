"""The one local cache of store files: verified against the manifest once, re-hashed only when changed.

Serving memory-maps files, and a mapped file must never change under it: bytes written into a mapped
store file in place are served unverified, and a mapped file truncated in place kills the process
with SIGBUS. So serving (`private=True`) maps only private read-only copies in this cache, which
nothing but this cache writes (an S3 store's files are copied here anyway, to be mapped at all);
readers that do not keep files mapped (builds, validation) read a local store's files in place.
Either way each file is hashed once and compared with the sha256 its manifest names, and the verified
digest is recorded beside it together with the file's (size, mtime_ns, ctime_ns, inode): a later load
of the same unchanged file trusts the record instead of re-reading gigabytes, and any change to the
file makes it hashed (and refused) again; `rehash=True` (a reload) trusts no record.

Layout, one directory per store and user (`<base>/<sha256(store url)[:16]>/`, mode 0700, refused
when another user owns it, so nobody can plant files in it):

    blobs/<sha256>/<name>             a copy (mode 0444) of a remote or served file, keyed by its content
    blobs/<sha256>/<name>.verified    {"sha256", "size", "mtime_ns", "ctime_ns", "inode"}; its mtime = last use
    local/<sha256(path)[:32]>.json    the same record for a file of a local store, verified in place
    remote/<sha256(url)[:32]>.json    {"path", "sha256", "identity"}: an S3 object a move of CURRENT checked
                                      in place (`confirm`), its (size, ETag, LastModified, VersionId) then

Copies are bounded by `max_bytes`: least recently used first, never a file a `Pins` holds (an open
`VersionIndex` holds one for every file it maps; `pins/<sha256>.<pid>` tells other processes). A copy
is only ever replaced or removed by name (rename, unlink), never written or truncated in place, so a
process that maps one keeps its verified bytes even if another evicts or replaces it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import Corrupt
from storage.fs import file_digest, is_local
from storage.layout import split_version_url
from storage.manifest import Manifest
from storage.scratch import private_dir
from storage.verify import VersionFiles, check_digest, expected_sha256, verify_file

log = logging.getLogger(__name__)

Hasher = Callable[[str], str]
SIDECAR = ".verified"
DEFAULT_MAX_BYTES = 20 * 2**30  # what a cache holds when nobody says (settings: RAGINDEX_CACHE_MAX_SIZE)


def sha256_of_path(path: str) -> str:
    """sha256 of a local file (the default `Hasher`)."""
    return file_digest(LocalFileSystem(), path)


def default_cache_base() -> str:
    """`~/.cache/ragindex`: per user, never a shared temp directory. Settings may name another base."""
    return str(Path.home() / ".cache" / "ragindex")


def store_root_url(url: str) -> str:
    """The store a version file's URL belongs to (what the cache is kept per), else its directory."""
    split = split_version_url(url)
    return split[0] if split else url.rsplit("/", 1)[0]


def store_key(store_url: str) -> str:
    return hashlib.sha256(store_url.encode()).hexdigest()[:16]


def _private_cache_dir(path: str, tighten: bool = True) -> None:
    private_dir(path, tighten, what="cache directory", hint=" (give another --cache-dir or RAGINDEX_CACHE_DIR)")


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def file_stamp(path: str) -> dict[str, int]:
    """What changes when a file is written, truncated or replaced: (size, mtime_ns, ctime_ns, inode)."""
    return _stamp(os.stat(path))


@dataclass(frozen=True)
class CacheConfig:
    """Where this user's cache lives and how much it may hold. Built once at the edge from the settings
    (`flows.settings.Settings.cache_config`: RAGINDEX_CACHE_DIR, RAGINDEX_CACHE_MAX_SIZE) and carried down
    by the store and its locations (`IndexStore.cache`, `Location.cache`), so every step that reads store
    files through the cache, serving or building, opens the same one; nobody below the edge guesses it."""

    base: str | None = None  # None: default_cache_base()
    max_bytes: int | None = None  # None: DEFAULT_MAX_BYTES

    def for_store(self, store_url: str, hasher: Hasher | None = None) -> FileCache:
        """The cache of the store at `store_url`."""
        return FileCache.for_store(store_url, self.base, self.max_bytes, hasher)


class FileCache:
    """Verified local paths for store files. Safe for threads of one process; processes share the disk."""

    def __init__(self, root: str, max_bytes: int | None = None, hasher: Hasher | None = None) -> None:
        self.root = root
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.hasher = hasher or sha256_of_path  # the seam tests count hashes through
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        _private_cache_dir(os.path.dirname(os.path.abspath(root)), tighten=False)
        _private_cache_dir(root)

    @classmethod
    def for_store(
        cls, store_url: str, base: str | None = None, max_bytes: int | None = None, hasher: Hasher | None = None
    ) -> FileCache:
        return cls(os.path.join(base or default_cache_base(), store_key(store_url)), max_bytes, hasher)

    def pins(self, private: bool = False, rehash: bool = False) -> Pins:
        """A set of files this caller is about to use, kept from eviction until it is released.
        `private`: private copies even of a local store's files (for mapping); `rehash`: trust no record."""
        return Pins(self, private, rehash)

    # -- one file ----------------------------------------------------------------------------------

    def verified_path(self, fs: fsspec.AbstractFileSystem, path: str, sha256: str | None, label: str,
                      private: bool = False, rehash: bool = False) -> str:
        """A local path whose bytes have sha256 `sha256`: in place for a local file, else (and always when
        `private`) a cached read-only copy that no store writer can touch; `rehash` hashes it even when its
        record says it is unchanged.

        `sha256=None` (a file no manifest covers yet, e.g. during validation) copies a remote file and keys
        it by the digest it turns out to have. `Corrupt` when the bytes are not the expected ones."""
        if not is_local(fs):
            return self._verified_copy(fs, path, sha256, label, rehash)
        if private and sha256 is not None:
            return self._private_copy_of_local(path, sha256, label, rehash)
        return self._verified_in_place(path, sha256, label, rehash)

    def confirm(self, fs: fsspec.AbstractFileSystem, path: str, sha256: str, label: str) -> None:
        """The store's own file at `path` still hashes to `sha256` (`Corrupt` naming `label` otherwise),
        hashed only when it changed since it was last found so: a move of CURRENT checks every file of the
        lineage it will serve, and most of them are the ancestors' unchanged gigabytes.

        A local file is known unchanged by its (size, mtime_ns, ctime_ns, inode), which any write, truncation
        or replacement moves. An S3 object by its (size, ETag, LastModified, VersionId): an object is never
        changed in place, and an overwrite with other bytes gets another ETag (a crafted MD5 collision could
        keep it; the sha256 of every copy a server maps is still checked when it loads). Nothing is copied."""
        if is_local(fs):
            self._verified_in_place(path, sha256, label)
            return
        try:
            seen = _object_identity(fs.info(path))
        except FileNotFoundError:
            raise Corrupt(f"{label}: file is missing") from None
        record_path = os.path.join(self.root, "remote", hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")
        record = _read_record(record_path)
        if seen and record and record.get("path") == path and record.get("sha256") == sha256 \
                and record.get("identity") == seen:
            return
        verify_file(fs, path, sha256, label)
        if seen and _object_identity(fs.info(path)) == seen:  # not replaced while it was read
            _write_record(record_path, {"path": path, "sha256": sha256, "identity": seen})

    def _private_copy_of_local(self, path: str, sha256: str, label: str, rehash: bool) -> str:
        """A verified copy of a local store's file, and the store's file itself still the verified one (a
        store file changed since is refused, whatever copy exists). When the copy is made, it is what is
        hashed: the store's file counts as verified too if its stamp did not move while it was read."""
        target = os.path.join(self.root, "blobs", sha256, os.path.basename(path))
        if self._still_verified(target, sha256, rehash):
            self._verified_in_place(path, sha256, label, rehash)
            return target
        try:
            before = os.stat(path)
        except FileNotFoundError:
            raise Corrupt(f"{label}: file is missing") from None
        target = self._verified_copy(LocalFileSystem(), path, sha256, label)
        if file_stamp(path) == _stamp(before):
            _write_record(self._record_path(path), {"path": path, "sha256": sha256, **_stamp(before)})
        else:  # written while it was copied: the copy is good, the store's file must be checked on its own
            self._verified_in_place(path, sha256, label, rehash=True)
        return target

    def _record_path(self, path: str) -> str:
        return os.path.join(self.root, "local", hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")

    def _verified_in_place(self, path: str, sha256: str | None, label: str, rehash: bool = False) -> str:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise Corrupt(f"{label}: file is missing") from None
        record_path = self._record_path(path)
        record = _read_record(record_path)
        stamp = _stamp(st)
        if not rehash and record and record.get("path") == path and all(
            record.get(k) == v for k, v in stamp.items()
        ) and (sha256 is None or record.get("sha256") == sha256):
            return path
        actual = self.hasher(path)
        if sha256 is not None:
            check_digest(actual, sha256, label)
        _write_record(record_path, {"path": path, "sha256": actual, **stamp})
        return path

    def _verified_copy(self, fs: fsspec.AbstractFileSystem, path: str, sha256: str | None, label: str,
                       rehash: bool = False) -> str:
        name = os.path.basename(path)
        if sha256 is not None:
            target = os.path.join(self.root, "blobs", sha256, name)
            if self._still_verified(target, sha256, rehash):
                return target
        tmp_dir = os.path.join(self.root, "tmp")
        os.makedirs(tmp_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(tmp_dir, f"{name}.{uuid.uuid4().hex}")
        try:
            try:
                fs.get_file(path, tmp)
            except FileNotFoundError:
                raise Corrupt(f"{label}: file is missing") from None
            actual = self.hasher(tmp)
            if sha256 is not None:
                check_digest(actual, sha256, label)
            target = os.path.join(self.root, "blobs", actual, name)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)  # by name: a process mapping the copy it replaces keeps that one
            _write_record(target + SIDECAR, {"sha256": actual, **_stamp(os.stat(target))})
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        log.info("copied %s into the local cache as %s", path, target)
        self.evict(keep={actual})
        return target

    def _still_verified(self, target: str, sha256: str, rehash: bool = False) -> bool:
        """True when `target` exists with the record it was verified with; re-hashes it when it changed
        (always, with `rehash`)."""
        try:
            st = os.stat(target)
        except FileNotFoundError:
            return False
        record = _read_record(target + SIDECAR)
        stamp = _stamp(st)
        if rehash or not (record and record.get("sha256") == sha256
                          and all(record.get(k) == v for k, v in stamp.items())):
            if self.hasher(target) != sha256:
                log.warning("cached copy %s no longer matches its sha256; fetching it again", target)
                return False
            _write_record(target + SIDECAR, {"sha256": sha256, **stamp})
        os.utime(target + SIDECAR)  # last use, for least-recently-used eviction
        return True

    # -- pins and eviction ---------------------------------------------------------------------------

    def _pin(self, sha256: str) -> None:
        with self._lock:
            self._pins[sha256] = self._pins.get(sha256, 0) + 1
            if self._pins[sha256] == 1:  # other processes sharing this cache see it too
                os.makedirs(os.path.join(self.root, "pins"), mode=0o700, exist_ok=True)
                open(self._pin_file(sha256, os.getpid()), "w").close()

    def _unpin(self, sha256: str) -> None:
        with self._lock:
            left = self._pins.get(sha256, 0) - 1
            if left > 0:
                self._pins[sha256] = left
                return
            self._pins.pop(sha256, None)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._pin_file(sha256, os.getpid()))

    def _pin_file(self, sha256: str, pid: int) -> str:
        return os.path.join(self.root, "pins", f"{sha256}.{pid}")

    def pinned(self) -> set[str]:
        """sha256s in use by this process or by another live process sharing the cache."""
        with self._lock:
            held = {k for k, v in self._pins.items() if v > 0}
        pins = os.path.join(self.root, "pins")
        for name in os.listdir(pins) if os.path.isdir(pins) else ():
            sha, _, pid = name.rpartition(".")
            if sha in held or not pid.isdigit():
                continue
            if _alive(int(pid)):
                held.add(sha)
            else:  # left by a process that died while serving
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(pins, name))
        return held

    def blobs(self) -> list[tuple[float, str, int]]:
        """(last use, sha256 dir, bytes) of every cached copy, least recently used first."""
        base = os.path.join(self.root, "blobs")
        out = []
        for entry in os.scandir(base) if os.path.isdir(base) else ():
            files = [f for f in os.scandir(entry.path) if f.is_file()]
            size = sum(f.stat().st_size for f in files if not f.name.endswith(SIDECAR))
            used = max((f.stat().st_mtime for f in files if f.name.endswith(SIDECAR)), default=0.0)
            out.append((used, entry.name, size))
        return sorted(out)

    def evict(self, keep: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Remove least recently used copies until the cache fits `max_bytes`; never a pinned one
        (nor `keep`: the copy just placed). Returns the sha256s removed."""
        blobs = self.blobs()
        total = sum(size for _, _, size in blobs)
        removed = []
        held = self.pinned() | set(keep)
        for _, sha, size in blobs:
            if total <= self.max_bytes:
                break
            if sha in held:
                continue
            shutil.rmtree(os.path.join(self.root, "blobs", sha), ignore_errors=True)
            total -= size
            removed.append(sha)
        if total > self.max_bytes:
            log.warning("cache %s holds %d bytes (limit %d): the rest is being served", self.root, total,
                        self.max_bytes)
        return removed


@dataclass(frozen=True)
class PinnedFile:
    """A verified local path a `Pins` handed out: what it must still hash to, and what to call it."""

    path: str
    sha256: str
    label: str
    stamp: dict[str, int]  # (size, mtime_ns, ctime_ns, inode) when it was verified

    def changed(self) -> bool:
        """True when the file is gone or is no longer the file (or the bytes) it was when verified:
        a write, a truncation or a replacement changes its ctime, size or inode."""
        try:
            return file_stamp(self.path) != self.stamp
        except FileNotFoundError:
            return True


class Pins:
    """Files in use by one opened version: pinned against eviction until `release`. (Not a lock: the
    store's leases are `storage.lock.Lease`.)"""

    def __init__(self, cache: FileCache, private: bool = False, rehash: bool = False) -> None:
        self.cache = cache
        self.private = private
        self.rehash = rehash
        self.digests: list[str] = []
        self.files: list[PinnedFile] = []  # every verified local path handed out, for re-verification
        self._released = False

    def path(self, fs: fsspec.AbstractFileSystem, path: str, sha256: str, label: str) -> str:
        """`FileCache.verified_path`, pinned until `release`."""
        self.cache._pin(sha256)
        self.digests.append(sha256)
        try:
            local = self.cache.verified_path(fs, path, sha256, label, self.private, self.rehash)
        except BaseException:
            self.digests.pop()
            self.cache._unpin(sha256)
            raise
        self.files.append(PinnedFile(local, sha256, label, file_stamp(local)))
        return local

    def version_file(self, store: VersionFiles, manifest: Manifest, relpath: str) -> str:
        """A local path to a committed version's file whose bytes match its manifest: in place for a local store,
        else a cached copy; hashed once per unchanged file, pinned until `release`."""
        expected = expected_sha256(manifest, relpath)  # first: a name no checksum covers never touches a path
        remote = store.version_path(manifest.version, relpath)
        return self.path(store.fs, remote, expected, f"version {manifest.version}: {relpath}")

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for sha in self.digests:
            self.cache._unpin(sha)
        self.digests = []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _object_identity(info: dict[str, Any]) -> dict[str, Any] | None:
    """What changes when an object store's object is written: None when the store reports no ETag (then
    the object is always hashed)."""
    etag = info.get("ETag") or info.get("etag")
    if not etag:
        return None
    modified = info.get("LastModified") or info.get("mtime")
    return {"size": info.get("size"), "etag": str(etag), "modified": str(modified),
            "version_id": str(info.get("VersionId") or "")}


def _read_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # missing or malformed: the file is simply hashed again
    return data if isinstance(data, dict) else None


def _write_record(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)

