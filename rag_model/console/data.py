"""What the console reads, cached where it is expensive and cannot change: the catalogue (until the
store's listing changes), diffs and opened versions (a committed version never changes)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from rag_model.compare import Comparison
from rag_model.console.charts import chart_key
from rag_model.index import VersionIndex
from rag_model.version_diff import VersionDiff, diff_versions
from storage.catalog import Catalog, CatalogCache, VersionEntry
from storage.errors import NotFound, RagindexError, Rejected
from storage.manifest import HistoryEntry, Manifest
from storage.store import IndexStore
from storage.timing import duration

V = TypeVar("V")


class _Lru:
    """A few values by key, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Freshness:
    watermark: str  # newest dump or adds-changes day applied (YYYYMMDD)
    age_days: int | None  # how old that is today
    live_to: str | None = None  # meta.dt of the newest EventStreams event applied, when live runs extend it
    live_age: str | None = None  # how long ago that event was, e.g. "7m12s"

    @classmethod
    def of(cls, entry: VersionEntry | None) -> Freshness | None:
        if entry is None or entry.lineage is None:
            return None
        mark = entry.lineage.watermark
        now = datetime.now(UTC)
        try:
            age = (now.date() - datetime.strptime(mark, "%Y%m%d").replace(tzinfo=UTC).date()).days
        except ValueError:
            age = None
        live_to = entry.lineage.live_to
        if live_to is None:
            return cls(mark, age)
        try:
            newest = datetime.fromisoformat(live_to.replace("Z", "+00:00"))
            live_age = duration(max(0.0, (now - newest).total_seconds())) if newest.tzinfo else None
        except ValueError:
            live_age = None
        return cls(mark, age, live_to, live_age)


class ConsoleData:
    def __init__(self, store: IndexStore, encode: Callable[[list[str]], Any], serving_key: Callable[[], str | None],
                 cache_dir: str | None = None) -> None:
        self.store = store
        self._encode = encode  # the serving question encoder's
        self._serving_key = serving_key  # the encoder fingerprint key serving pairs that encoder with
        self._cache_dir = cache_dir
        self._catalogs = CatalogCache()
        self._diffs = _Lru(16)
        self._indexes = _Lru(4)  # each pins its files in the local cache while held
        self._charts = _Lru(8)

    def catalog(self) -> Catalog:
        return self._catalogs.read(self.store)

    def entry(self, version_id: str, catalog: Catalog | None = None) -> VersionEntry:
        for v in (catalog or self.catalog()).versions:
            if v.version == version_id:
                return v
        raise NotFound(f"no version {version_id!r} in this store")

    def manifest(self, version_id: str) -> Manifest:
        return self.store.manifest(version_id)

    def history(self) -> list[HistoryEntry]:
        return list(reversed(self.store.history()))

    def diff(self, a: str, b: str) -> VersionDiff:
        catalog = self.catalog()
        self.entry(a, catalog), self.entry(b, catalog)
        return self._diffs.get((a, b), lambda: diff_versions(self.store, a, b, catalog))

    def compare(self, query: str, a: str, b: str, k: int) -> Comparison:
        if not query.strip():
            raise RagindexError("empty question")
        indexes = [self._indexes.get(v, lambda v=v: VersionIndex.open(self.store, v, cache_dir=self._cache_dir))
                   for v in (a, b)]
        key = self._serving_key()
        for index in indexes:
            if key is not None and index.manifest.encoder.key != key:
                raise Rejected(f"version {index.version} was encoded by another encoder ({index.manifest.encoder.key}) "
                               f"than the one serving ({key}): its answers cannot be compared here")
        vectors = self._encode([query])
        hits = [index.search(vectors, k)[0] for index in indexes]
        return Comparison(query, a, b, hits[0], hits[1])

    def chart(self, name: str, draw: Callable[[list[VersionEntry]], bytes], versions: list[VersionEntry]) -> bytes:
        """A chart's SVG, drawn again only when what it shows changed."""
        return self._charts.get((name, chart_key(versions)), lambda: draw(versions))
