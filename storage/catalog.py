"""The catalogue of a store: CURRENT, the pins, and every version with its lineage, sizes and the
passages it serves, the ones whose manifest cannot be read included.

One typed read for everything that shows a store (`ragindex versions`, its `--json`, a web UI), so
none of them walks the store or interprets a manifest on its own. Sizes come from one listing of
`versions/`, not a size request per file: the manifest records checksums, not sizes, and a store
keeps many versions of thousands of shards.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.errors import NotFound, Untrusted
from storage.holds import Hold
from storage.layout import BOOKKEEPING_FILES, MANIFEST, MANIFEST_SIGNATURE, VERSIONS_DIR
from storage.manifest import Manifest, Pointer
from storage.signing import signer_of
from storage.store import CorruptVersion, IndexStore
from storage.verify import signature_bytes


@dataclass(frozen=True)
class LineageSummary:
    """Where a version's rows come from: a full build of one dump, or a delta over its segments."""

    mode: str  # full / delta / takedown (a delta whose only change is tombstoning pages taken down) / compaction
    parent: str | None  # a delta's parent; for a full build, the version whose vectors it reused
    base_dump: str  # the full dump the lineage started from (a full build's own dump)
    days: tuple[str, ...]  # the adds-changes days applied on top of base_dump, oldest first
    segments: tuple[str, ...]  # the versions whose rows a delta serves besides its own
    live_to: str | None = None  # meta.dt of the newest EventStreams event live runs applied (ISO-8601 UTC)

    @property
    def watermark(self) -> str:
        """The newest dump or adds-changes day this lineage has applied: how fresh its knowledge is."""
        return self.days[-1] if self.days else self.base_dump

    @classmethod
    def of(cls, manifest: Manifest) -> LineageSummary:
        lineage = manifest.effective_lineage
        return cls(
            mode=manifest.mode,
            parent=manifest.parent,
            base_dump=lineage.base_dump,
            days=tuple(d.date for d in lineage.days),
            segments=tuple(s.version for s in manifest.segments),
            live_to=lineage.stream.newest_event if lineage.stream else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "parent": self.parent, "base_dump": self.base_dump, "days": list(self.days),
                "segments": list(self.segments), "live_to": self.live_to}


UNSIGNED = "unsigned"
INVALID = "invalid"  # a manifest.sig that is malformed or not a signature of the manifest's bytes

# What a version whose manifest cannot be read shows for its lineage.
_UNKNOWN_LINEAGE = {"mode": None, "parent": None, "base_dump": None, "days": [], "segments": [], "live_to": None}


@dataclass(frozen=True)
class VersionEntry:
    """One version as the catalogue lists it. Everything read from its manifest is None (or empty)
    when the manifest cannot be read (`status` "corrupt")."""

    version: str
    status: str  # ready / rejected, or corrupt
    current: bool
    previous: bool
    pinned: bool
    reason: str | None  # why it was rejected, or why its manifest cannot be read
    path: str  # URL of its manifest
    own_bytes: int  # its own directory's files: what deleting it frees
    passages: int | None = None  # its own rows
    live_passages: int | None = None  # the rows it serves, its segments' included, minus tombstones
    index_spec: str | None = None
    factory: str | None = None
    created_at: datetime | None = None
    lineage: LineageSummary | None = None
    missing_segments: tuple[str, ...] = ()  # segments whose directory is gone: it cannot be served
    shared_bytes: int | None = None  # its segments' own bytes: what it serves but does not store
    signed_by: str = UNSIGNED  # the id of the key whose signature its manifest carries, UNSIGNED or INVALID
    trusted: bool | None = None  # signed by a key this reader trusts (None: it is configured with none)
    recall: float | None = None  # validation's recall@10 against exact search
    canary_hit_rate: float | None = None  # validation's canary questions answered in the top k

    @property
    def corrupt(self) -> bool:
        return self.status == "corrupt"

    def lineage_text(self) -> str:
        """`full (dump 20240101)` or `delta of <parent> (base 20240101 + 3 days → 20240104)`."""
        lineage = self.lineage
        if lineage is None:
            return ""
        if lineage.mode == "full":
            return f"full (dump {lineage.base_dump})"
        days = lineage.days
        applied = f" + {len(days)} day{'s' if len(days) != 1 else ''} → {days[-1]}" if days else ""
        missing = f"; missing segment(s): {', '.join(self.missing_segments)}" if self.missing_segments else ""
        return f"{lineage.mode} of {lineage.parent} (base {lineage.base_dump}{applied}){missing}"

    def to_json(self) -> dict[str, Any]:
        """The row `ragindex versions --json` prints (scripts read these keys)."""
        return {
            "version": self.version, "status": self.status, "passages": self.passages,
            "index_spec": self.index_spec, "factory": self.factory,
            "bytes": self.own_bytes,  # the same number, under the name existing readers know
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "current": self.current, "previous": self.previous, "pinned": self.pinned,
            "reason": self.reason, "path": self.path,
            **(self.lineage.to_json() if self.lineage else _UNKNOWN_LINEAGE),
            "missing_segments": list(self.missing_segments),
            "own_bytes": self.own_bytes, "shared_bytes": self.shared_bytes, "live_passages": self.live_passages,
            "signed_by": self.signed_by, "trusted": self.trusted,
            "recall": self.recall, "canary_hit_rate": self.canary_hit_rate,
        }


@dataclass(frozen=True)
class Catalog:
    store: str  # the store's URL
    current: Pointer | None
    versions: tuple[VersionEntry, ...]  # corrupt ones first (they need an operator), then newest first
    holds: tuple[Hold, ...] = ()  # the active rollback holds (storage.holds), oldest first

    @property
    def has_deltas(self) -> bool:
        return any(v.lineage is not None and v.lineage.mode != "full" for v in self.versions)

    @property
    def has_signatures(self) -> bool:
        """A version is signed, or the reader trusts keys: who signed what is worth showing."""
        return any(v.signed_by != UNSIGNED or v.trusted is not None for v in self.versions if not v.corrupt)

    def to_json(self) -> dict[str, Any]:
        """What `ragindex versions --json` prints."""
        return {
            "store": self.store,
            "current": self.current.model_dump(mode="json") if self.current else None,
            "versions": [v.to_json() for v in self.versions],
            "holds": [h.model_dump(mode="json") for h in self.holds],
        }


@dataclass(frozen=True)
class _Scan:
    """Every manifest and the sizes, as one listing of `versions/` found them."""

    ids: tuple[str, ...]  # the version directories listed
    manifests: tuple[Manifest, ...]
    corrupt: tuple[CorruptVersion, ...]
    sizes: dict[str, int]
    signed: frozenset[str]  # the versions that have a signature file

    @classmethod
    def of(cls, store: IndexStore) -> _Scan:
        ids = tuple(store.version_ids())
        manifests, corrupt = store.scan_versions()
        sizes, signed = _listing(store)
        return cls(ids, tuple(manifests), tuple(corrupt), sizes, frozenset(signed))

    def still_valid(self, store: IndexStore) -> bool:
        """Committed versions never change: the scan holds while the listing does and no directory that was
        staging then has a manifest now."""
        if tuple(store.version_ids()) != self.ids:
            return False
        seen = {m.version for m in self.manifests} | {c.version for c in self.corrupt}
        return not any(store.has_version(v) for v in self.ids if v not in seen)


class CatalogCache:
    """`read_catalog` for a process that shows one store again and again (the console): manifests and
    sizes are read again only when the listing of `versions/` changed or a staged version was committed;
    CURRENT, the pins and the holds are read every time."""

    def __init__(self) -> None:
        self._scans: dict[str, _Scan] = {}
        self._lock = threading.Lock()

    def read(self, store: IndexStore) -> Catalog:
        with self._lock:
            scan = self._scans.get(store.url)
            if scan is None or not scan.still_valid(store):
                scan = self._scans[store.url] = _Scan.of(store)
        return read_catalog(store, scan)


def read_catalog(store: IndexStore, scan: _Scan | None = None) -> Catalog:
    """The store as it is now: one read of CURRENT and the pins, every manifest, one listing for sizes
    and signatures (a signed version's signature is read and checked; an unsigned one costs nothing;
    `scan`: the manifests, sizes and signatures a `CatalogCache` already holds)."""
    current = store.current()
    pinned = store.pinned()
    scan = scan or _Scan.of(store)
    manifests, corrupt, sizes, signed = scan.manifests, scan.corrupt, scan.sizes, scan.signed
    present = {m.version for m in manifests} | {c.version for c in corrupt}

    def marks(version_id: str) -> dict[str, bool]:
        return {"current": bool(current and current.version == version_id),
                "previous": bool(current and current.previous == version_id),
                "pinned": version_id in pinned}

    def listed(m: Manifest) -> VersionEntry:
        lineage = LineageSummary.of(m)
        return VersionEntry(
            version=m.version, status=m.status, **marks(m.version),
            reason=m.validation.reason if m.validation else None, path=store.version_url(m.version, MANIFEST),
            own_bytes=sizes.get(m.version, 0), passages=m.counts.get("passages"), live_passages=m.live_passages,
            index_spec=m.index.spec, factory=m.index.factory, created_at=m.created_at, lineage=lineage,
            missing_segments=tuple(v for v in lineage.segments if v not in present),
            shared_bytes=sum(sizes.get(v, 0) for v in lineage.segments),
            **_signature(store, m.version, m.version in signed),
            recall=_check(m, "recall_at_10", "recall"), canary_hit_rate=_check(m, "canaries", "hit_rate"),
        )

    def unreadable(c: CorruptVersion) -> VersionEntry:
        return VersionEntry(version=c.version, status="corrupt", **marks(c.version), reason=c.reason, path=c.path,
                            own_bytes=sizes.get(c.version, 0))

    entries = [unreadable(c) for c in corrupt] + [listed(m) for m in reversed(manifests)]
    return Catalog(store=store.url, current=current, versions=tuple(entries), holds=tuple(store.holds()))


def _check(manifest: Manifest, check: str, key: str) -> float | None:
    """One number of a validation check, if the version's validation recorded it."""
    value = (manifest.validation.checks.get(check) or {}).get(key) if manifest.validation else None
    return float(value) if isinstance(value, int | float) else None


def _signature(store: IndexStore, version_id: str, has_signature: bool) -> dict[str, str | bool | None]:
    """Who signed a version (`signed_by`: checked with the key its signature carries, whoever trusts
    it) and whether this reader's trusted keys include that key (`trusted`)."""
    signed_by = UNSIGNED
    if has_signature:
        try:
            signed_by = signer_of(store.manifest_bytes(version_id), signature_bytes(store, version_id) or b"")
        except NotFound:
            signed_by = UNSIGNED  # deleted since the listing
        except Untrusted:
            signed_by = INVALID
    keys = store.trusted_keys
    return {"signed_by": signed_by, "trusted": None if keys is None else signed_by in keys.keys}


def _listing(store: IndexStore) -> tuple[dict[str, int], set[str]]:
    """Bytes of each version directory's files but its manifest, signature and staging marker (what
    `IndexStore.version_bytes` counts for one version), and the versions that have a signature, from
    one listing of the whole `versions/`."""
    base = store.path(VERSIONS_DIR)
    try:
        infos = store.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}, set()
    sizes: dict[str, int] = {}
    signed: set[str] = set()
    for path, info in infos.items():
        version, _, inner = path.rstrip("/")[len(base) + 1:].partition("/")
        if inner == MANIFEST_SIGNATURE:
            signed.add(version)
        if info.get("type") == "directory" or not inner or inner in BOOKKEEPING_FILES:
            continue
        sizes[version] = sizes.get(version, 0) + int(info.get("size") or 0)
    return sizes, signed
