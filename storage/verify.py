"""Check a version's files against the sha256s its manifest names, before anything trusts them.

The manifest is written last and records the sha256 of every file of the version; every reader
(promote, rollback, serving, `ragindex query`, embedding reuse) compares what it is about to use
with it. A mismatch, a missing or a truncated file raises `Corrupt` with one line naming the file.

Where a reader trusts signing keys (`IndexStore.trusted_keys`), each manifest it reads to promote or
serve a version, its ancestors' included, must also carry a signature by one of them
(`signed_manifest`, `segment_manifests`); otherwise it is `Untrusted`, in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Protocol

import fsspec

from storage.errors import Corrupt, NotFound, Rejected, Untrusted
from storage.fs import file_digest
from storage.layout import MANIFEST_SIGNATURE
from storage.manifest import Manifest, SegmentRef
from storage.signing import MAX_SIGNATURE_BYTES, TrustedKeys


class VersionFiles(Protocol):
    """What verification reads of a store (`storage.store.IndexStore`, which imports this module)."""

    fs: fsspec.AbstractFileSystem
    trusted_keys: TrustedKeys | None

    def version_path(self, version_id: str, *parts: str) -> str: ...

    def manifest_bytes(self, version_id: str) -> bytes: ...

    def manifest(self, version_id: str, data: bytes | None = None) -> Manifest: ...


def expected_sha256(manifest: Manifest, relpath: str) -> str:
    """The sha256 the manifest names for `relpath`; `Corrupt` when the manifest does not cover it."""
    digest = manifest.files.get(relpath)
    if not digest:
        raise Corrupt(f"version {manifest.version}: {relpath} is not covered by its manifest's checksums")
    return digest


def check_digest(actual: str, expected: str, label: str) -> None:
    if actual != expected:
        raise Corrupt(
            f"{label}: sha256 {actual[:16]}… is not the manifest's {expected[:16]}… (file altered or truncated)"
        )


def verify_file(fs: fsspec.AbstractFileSystem, path: str, expected: str, label: str) -> None:
    """Hash `path` and compare with `expected`; `Corrupt` naming `label` when missing or different."""
    try:
        actual = file_digest(fs, path)
    except FileNotFoundError:
        raise Corrupt(f"{label}: file is missing") from None
    check_digest(actual, expected, label)


def read_verified(fs: fsspec.AbstractFileSystem, path: str, expected: str, label: str) -> bytes:
    """The whole of `path`, read once and returned only if it hashes to `expected` (`Corrupt` naming
    `label` when missing or different): for a reader that needs every byte anyway, one read instead
    of a hashing pass followed by a second read of the same file."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise Corrupt(f"{label}: file is missing") from None
    check_digest(hashlib.sha256(data).hexdigest(), expected, label)
    return data


FileCheck = Callable[[fsspec.AbstractFileSystem, str, str, str], None]
"""(fs, path, expected sha256, label) -> None, or `Corrupt`: `verify_file`, or a cache's `confirm`."""


def verify_version(
    store: VersionFiles, version_id: str, relpaths: Iterable[str] | None = None, manifest: Manifest | None = None,
    label: str | None = None, check: FileCheck = verify_file,
) -> Manifest:
    """Verify `relpaths` of a version (default: every file its manifest lists) and return the manifest.
    `label` names the version in an error (default "version <id>"); `check` verifies one file."""
    manifest = manifest or store.manifest(version_id)
    label = label or f"version {version_id}"
    wanted = sorted(manifest.files) if relpaths is None else list(relpaths)
    if not wanted:
        raise Corrupt(f"{label}: its manifest lists no file checksums to verify")
    for rel in wanted:
        check(store.fs, store.version_path(version_id, rel), expected_sha256(manifest, rel), f"{label}: {rel}")
    return manifest


def signature_bytes(store: VersionFiles, version_id: str) -> bytes | None:
    """A version's `manifest.sig` as stored (None when it has none)."""
    try:
        with store.fs.open(store.version_path(version_id, MANIFEST_SIGNATURE), "rb") as f:
            return f.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        return None


def check_signature(store: VersionFiles, version_id: str, data: bytes) -> None:
    """With trusted keys configured, `Untrusted` (one line naming the version) unless `data`, the
    manifest's bytes as read, carry a signature by one of them; without, nothing is required."""
    if store.trusted_keys is None:
        return
    try:
        store.trusted_keys.check(data, signature_bytes(store, version_id))
    except Untrusted as exc:
        raise Untrusted(f"version {version_id} is refused: {exc}") from None


def signed_manifest(store: VersionFiles, version_id: str) -> Manifest:
    """The manifest of a version about to be promoted or served, its signature checked (`check_signature`)
    on the very bytes it is parsed from."""
    data = store.manifest_bytes(version_id)
    check_signature(store, version_id, data)
    return store.manifest(version_id, data)


def segment_manifests(store: VersionFiles, manifest: Manifest) -> list[Manifest]:
    """The ancestor manifests a delta version shares rows with, oldest first, each checked against the
    sha256 the delta recorded: a rewritten or replaced ancestor is `Corrupt`, never silently served; with
    trusted keys configured, an ancestor not signed by one of them is `Untrusted`."""
    found = []
    for ref in manifest.segments:
        label = f"version {manifest.version}: segment {ref.version}"
        try:
            data = store.manifest_bytes(ref.version)
        except NotFound:
            raise Corrupt(f"{label} is gone (its manifest is missing)") from None
        check_digest(hashlib.sha256(data).hexdigest(), ref.manifest_sha256, f"{label} manifest")
        try:
            check_signature(store, ref.version, data)
        except Untrusted as exc:
            raise Untrusted(f"version {manifest.version}: its segment {exc}") from None
        ancestor = store.manifest(ref.version, data)
        if ancestor.first_row_id != ref.first_row_id or ancestor.counts.get("passages") != ref.rows:
            raise Corrupt(f"{label} holds rows {ancestor.first_row_id}+{ancestor.counts.get('passages')}, "
                          f"not {ref.first_row_id}+{ref.rows}")
        found.append(ancestor)
    return found


def lineage_manifests(store: VersionFiles, manifest: Manifest) -> list[Manifest]:
    """The manifests whose own rows `manifest` serves: its ancestors', oldest first, each checked against
    the sha256 it pinned (a rewritten or missing one is `Corrupt`), then its own; `Rejected` when a segment
    was encoded by another encoder (its vectors would not be comparable)."""
    lineage = [*segment_manifests(store, manifest), manifest]
    for m in lineage:
        if m.encoder.key != manifest.encoder.key:
            raise Rejected(f"version {manifest.version}: segment {m.version} was encoded by another encoder "
                           f"({m.encoder.key}, not {manifest.encoder.key})")
    return lineage


def verify_lineage(store: VersionFiles, manifest: Manifest, check: FileCheck = verify_file) -> list[Manifest]:
    """Every file of every segment `manifest` serves (`lineage_manifests`) against the manifest naming it:
    the checks serving makes when it opens the version, made before CURRENT may name it (`check`: how one
    file is verified). Returns the lineage's manifests, oldest first."""
    lineage = lineage_manifests(store, manifest)
    for m in lineage:
        verify_version(store, m.version, manifest=m, check=check,
                       label=None if m is manifest else f"version {manifest.version}: segment {m.version}")
    return lineage


def pin_segment(store: VersionFiles, manifest: Manifest) -> SegmentRef:
    """A committed version as a segment of a child delta, pinned by the sha256 of its manifest as stored."""
    return manifest.as_segment(hashlib.sha256(store.manifest_bytes(manifest.version)).hexdigest())
