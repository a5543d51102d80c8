"""The content-hash lookup table of a version: where each passage's vector sits, found without rescanning.

Written once per version at build time beside the embeddings (`storage.layout.HASH_KEYS`,
`HASH_ROWS`, both covered by the manifest's sha256s):

    hash_keys.npy   the content hashes as fixed-width bytes (`S<w>`), sorted; equal hashes keep
                    shard/row order, so the first match is the first occurrence
    hash_rows.npy   int32 [n, 2]: (index into embeddings.json's shards, row in that shard), aligned

Embedding reuse sorts a new shard's hashes and finds them in the sorted keys by a fenced binary
search (`HashTable._leftmost`: cache-resident fences, then one 64-key block), so a refresh costs a
lookup per new row, nearly independent of the old version's size, plus the rows it actually copies,
instead of a scan of every earlier shard per new shard. The table is memory-mapped locally (only the pages the
binary search touches become resident). A version without a table (written before it existed), or
whose table does not verify, gets one built in memory from its passage shards -- once per process,
not once per shard, because opened tables are kept (versions a refresh reuses from are immutable).

Hashes are compared as fixed-width bytes, so a hash that differs from another only by trailing NUL
bytes would collide; content hashes are hex digests (tasks.chunk.content_hash) and never have them.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import layout
from storage.errors import RagindexError, first_line
from storage.fs import atomic_write, file_digest, is_local, join
from storage.location import Location
from storage.manifest import Manifest
from storage.records import EmbeddingsSummary

log = logging.getLogger(__name__)

_KEEP_OPEN = 4  # tables kept per process: a refresh reuses from at most a few versions (find_reuse_sources)


def hash_keys(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Content hashes (string, no nulls) as a fixed-width bytes array, straight from Arrow's buffers."""
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    arr = hashes.cast(pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    if n == 0:
        return np.zeros(0, dtype="S1")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max()))
    if (lengths == width).all():  # the normal case: every hash is a digest of the same length
        return data.copy().view(f"S{width}")
    out = np.zeros(n, dtype=f"S{width}")
    cells = out.view(np.uint8).reshape(n, width)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(data)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    cells[rows, cols] = data
    return out


FENCE_STRIDE = 64  # keys per block of the fenced search; one fence per block stays in cache


@dataclass
class HashTable:
    """Sorted keys and their (shard, row) locations; see the module docstring."""

    keys: np.ndarray  # S<w>, sorted
    locations: np.ndarray  # int32 [n, 2]
    _fences: np.ndarray | None = None

    def _leftmost(self, needles: np.ndarray) -> np.ndarray:
        """np.searchsorted(keys, needles, side="left") for sorted needles, in time independent of the
        table's size: a plain binary search over a 3M-key table misses the CPU cache on most of its ~22
        levels (per 100k-row shard: 54 ms at 1M keys, 96 ms at 3M), so the lookup grew faster than the
        corpus. Instead one fence per FENCE_STRIDE keys (a table 64x smaller, cache-resident) locates
        each needle's block, and a vectorised binary search finishes inside it (6 steps, one block)."""
        n, stride = len(self.keys), FENCE_STRIDE
        if n <= 4 * stride:
            return np.searchsorted(self.keys, needles, side="left")
        if self._fences is None:
            self._fences = np.ascontiguousarray(self.keys[::stride])
        block = np.searchsorted(self._fences, needles, side="left")
        # fences[block-1] < needle <= fences[block]: the leftmost key >= needle is in ((block-1)*stride, block*stride].
        lo = np.maximum((block - 1) * stride + 1, 0)
        hi = np.minimum(block * stride, n)
        for _ in range(stride.bit_length()):
            active = lo < hi
            if not active.any():
                break
            mid = np.minimum((lo + hi) // 2, n - 1)
            below = self.keys[mid] < needles
            lo = np.where(active & below, mid + 1, lo)
            hi = np.where(active & ~below, mid, hi)
        return lo

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each key's first occurrence, -1 where it is absent."""
        shard = np.full(len(keys), -1, dtype=np.int64)
        row = np.full(len(keys), -1, dtype=np.int64)
        if len(keys) == 0 or len(self.keys) == 0:
            return shard, row
        width = self.keys.dtype.itemsize
        candidates = np.arange(len(keys))
        if keys.dtype.itemsize > width:
            # Longer than any key in the table: cannot be there (and must not be truncated into a match).
            candidates = candidates[np.char.str_len(keys) <= width]
        needles = keys[candidates].astype(self.keys.dtype)
        order = np.argsort(needles, kind="stable")
        needles, candidates = needles[order], candidates[order]
        pos = self._leftmost(needles)
        inside = pos < len(self.keys)
        hit = np.zeros(len(needles), dtype=bool)
        hit[inside] = self.keys[pos[inside]] == needles[inside]
        where = self.locations[pos[hit]]
        shard[candidates[hit]] = where[:, 0]
        row[candidates[hit]] = where[:, 1]
        return shard, row


def build_table(fs: Any, passage_paths: Sequence[str | None]) -> HashTable:
    """The table of passage shards `passage_paths` (shard i of the table is passage_paths[i]), in memory.

    A shard that is None or cannot be read is left out (with a warning): its vectors are then encoded again.
    """
    keys, locations = [], []
    for i, path in enumerate(passage_paths):
        if path is None:
            continue
        try:
            column = pq.read_table(path, columns=["content_hash"], filesystem=fs).column(0).combine_chunks()
        except (FileNotFoundError, pa.ArrowInvalid, OSError, KeyError) as exc:
            log.warning("reuse: cannot read %s (%s); skipping it", path, exc)
            continue
        valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        keys.append(hash_keys(pc.fill_null(column, ""))[valid])
        locations.append(np.stack([np.full(len(valid), i, dtype=np.int32), valid.astype(np.int32)], axis=1))
    if not keys:
        return HashTable(np.zeros(0, dtype="S1"), np.zeros((0, 2), dtype=np.int32))
    width = max(k.dtype.itemsize for k in keys)
    all_keys = np.concatenate([k.astype(f"S{width}") for k in keys])
    all_locations = np.concatenate(locations)
    # Stable: equal hashes stay in shard/row order, so lookup's leftmost match is the first occurrence.
    order = np.argsort(all_keys, kind="stable")
    return HashTable(all_keys[order], all_locations[order])


def write_hash_index(version: Location) -> int:
    """Write the table of a (staged) version from its passage shards, in embeddings.json's shard order."""
    fs, root = version.fs, version.path
    summary = EmbeddingsSummary.read(fs, join(root, layout.EMBEDDINGS_SUMMARY_PATH))
    paths = [join(root, layout.PASSAGES_DIR, layout.passage_shard(s.name)) for s in summary.shards]
    table = build_table(fs, paths)
    if len(table.keys) != summary.rows:
        raise RagindexError(f"{version}: {len(table.keys)} content hashes for {summary.rows} embedding rows")
    for name, array in ((layout.HASH_KEYS, table.keys), (layout.HASH_ROWS, table.locations)):
        with atomic_write(fs, join(root, layout.EMBEDDINGS_DIR, name)) as f:
            np.save(f, array, allow_pickle=False)
    return len(table.keys)


def _load(fs: Any, path: str) -> np.ndarray:
    if is_local(fs):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _stored_table(fs: Any, root: str, summary: EmbeddingsSummary) -> HashTable | None:
    """The version's written table if it is there, matches its manifest (when committed) and its
    summary; None otherwise (the caller builds one)."""
    rels = [f"{layout.EMBEDDINGS_DIR}/{name}" for name in (layout.HASH_KEYS, layout.HASH_ROWS)]
    paths = [join(root, rel) for rel in rels]
    if not all(fs.exists(p) for p in paths):
        return None
    manifest_path = join(root, layout.MANIFEST)
    if fs.exists(manifest_path):
        try:
            with fs.open(manifest_path, "rb") as f:
                files = Manifest.model_validate_json(f.read()).files
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            log.warning("reuse: cannot read %s (%s); building the table again", manifest_path, first_line(exc))
            return None
        for rel, path in zip(rels, paths, strict=True):
            if files.get(rel) != file_digest(fs, path):
                log.warning("reuse: %s does not match its manifest's sha256; building the table again", path)
                return None
    try:
        keys, locations = (_load(fs, p) for p in paths)
    except (ValueError, OSError) as exc:
        log.warning("reuse: cannot read the hash table of %s (%s); building it again", root, exc)
        return None
    shape_ok = (keys.ndim == 1 and keys.dtype.kind == "S" and locations.shape == (len(keys), 2)
                and locations.dtype == np.int32 and len(keys) == summary.rows)
    if not shape_ok or (len(keys) and int(locations[:, 0].max()) >= len(summary.shards)):
        log.warning("reuse: the hash table of %s does not fit its embeddings; building it again", root)
        return None
    return HashTable(keys, locations)


@dataclass
class ReuseSource:
    """An earlier version opened for reuse: its table and the .npy path of each table shard."""

    fs: Any
    npy_paths: list[str | None]  # per shard of embeddings.json; None: not to be reused from
    table: HashTable
    stored: bool  # False: built in memory because the version has no (good) table


_open: OrderedDict[tuple[str, str, str], ReuseSource | None] = OrderedDict()


def open_source(where: Location, key: str,
                source_shards: Callable[[Any, str, str], list[tuple[str, str]] | None]) -> ReuseSource | None:
    """The reuse source at version root `where` for fingerprint `key` (None: nothing to reuse there).

    `source_shards(fs, root, key)` gives the (passage shard, .npy) pairs the version's summary
    lists, or None when its vectors cannot be reused. Opened sources are kept per process, keyed
    by the summary's bytes, so every shard of a refresh shares one table.
    """
    fs, root, url = where.fs, where.path, where.url
    summary_path = join(root, layout.EMBEDDINGS_SUMMARY_PATH)
    try:
        with fs.open(summary_path, "rb") as f:
            summary_bytes = f.read()
    except FileNotFoundError:
        summary_bytes = b""
    cache_key = (url, key, hashlib.sha256(summary_bytes).hexdigest())
    if cache_key in _open:
        _open.move_to_end(cache_key)
        return _open[cache_key]
    pairs = source_shards(fs, root, key)
    source = None
    if pairs:
        summary = EmbeddingsSummary.model_validate_json(summary_bytes)
        # By name, so that shards `source_shards` leaves out are left out of the table's answers too.
        by_name = {npy.rsplit("/", 1)[-1]: (passages, npy) for passages, npy in pairs}
        listed = [by_name.get(s.name) for s in summary.shards]
        table = _stored_table(fs, root, summary)
        stored = table is not None
        if table is None:
            log.info("reuse: %s has no hash table; building one in memory for this refresh", url)
            table = build_table(fs, [p[0] if p else None for p in listed])
        source = ReuseSource(fs, [p[1] if p else None for p in listed], table, stored)
    _open[cache_key] = source
    while len(_open) > _KEEP_OPEN:
        _open.popitem(last=False)
    return source
