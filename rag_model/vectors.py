"""Embedding shards and exact search over them: shared by building, validation, embedding reuse and serving.

`open_embeddings` checks an embeddings directory (summary, sidecars, .npy headers) and returns
`EmbeddingShards`, which reads one shard at a time (memory-mapped locally, ranged reads elsewhere).
`read_rows` is the one way to read rows of a .npy. Exact top-k (the ground truth that tuning and the
recall check measure against) streams the shards through faiss.contrib's `knn_ground_truth`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from storage import layout
from storage.errors import RagindexError
from storage.fs import is_local, join
from storage.location import Location
from storage.manifest import EncoderFingerprint
from storage.records import EmbeddingSidecar, EmbeddingsSummary

if TYPE_CHECKING:
    from storage.cache import Pins
    from storage.manifest import Manifest
    from storage.store import IndexStore

TUNE_K = 10  # recall@10 is what tuning reaches for and validation checks
GT_K = 50  # exact neighbours kept per query, so that ties at rank 10 are not counted as misses
_BLOCK = 65536  # rows per block when streaming a shard


def read_npy_header(f: Any, path: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy file, leaving it positioned at the data."""
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except ValueError as exc:
        raise RagindexError(f"{path} is not a .npy file: {exc}") from None
    return shape, fortran, dtype


def check_shard_shape(shape: tuple, dtype: np.dtype, dim: int, path: str) -> None:
    if len(shape) != 2 or shape[1] != dim or np.dtype(dtype) != np.float32:
        raise RagindexError(f"{path}: expected float32 [rows, {dim}], found {np.dtype(dtype)} {list(shape)}")


def npy_from_bytes(data: bytes, dim: int, path: str) -> np.ndarray:
    """A float32 [n, dim] .npy held in memory, as a read-only view of its bytes (no copy)."""
    f = io.BytesIO(data)
    shape, fortran, dtype = read_npy_header(f, path)
    check_shard_shape(shape, dtype, dim, path)
    if fortran:
        raise RagindexError(f"{path}: Fortran-ordered arrays are not embedding shards")
    count = shape[0] * dim
    if len(data) - f.tell() < count * 4:
        raise RagindexError(f"{path}: truncated ({len(data)} bytes for {shape[0]} rows)")
    return np.frombuffer(data, dtype=np.float32, count=count, offset=f.tell()).reshape(shape)


def read_rows(fs: Any, path: str, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows `rows` of a float32 [n, dim] .npy, in the given order: memory-mapped locally, else one
    ranged read per run of consecutive rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if is_local(fs):
        arr = np.load(path, mmap_mode="r")
        check_shard_shape(arr.shape, arr.dtype, dim, path)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and (np.diff(rows) == 1).all():
            return np.array(arr[rows[0]: rows[-1] + 1], dtype=np.float32)  # one run: a slice, not a gather
        return np.asarray(arr[rows], dtype=np.float32)
    with fs.open(path, "rb") as f:
        shape, fortran, dtype = read_npy_header(f, path)
        check_shard_shape(shape, dtype, dim, path)
        if fortran:
            raise RagindexError(f"{path}: Fortran-ordered arrays are not embedding shards")
        offset = f.tell()
        row_bytes = dim * 4
        out = np.empty((len(rows), dim), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        start = 0
        for end in [*breaks.tolist(), len(rows)]:
            first, count = int(rows[start]), end - start
            f.seek(offset + first * row_bytes)
            out[start:end] = np.frombuffer(f.read(count * row_bytes), dtype=dtype).reshape(count, dim)
            start = end
        return out


def load_tombstones(source: str | io.BytesIO, version: str) -> np.ndarray:
    """A delta version's tombstones (a verified local path, or its bytes): int64 row ids, sorted, distinct."""
    try:
        arr = np.load(source, allow_pickle=False)
    except ValueError as exc:
        raise RagindexError(f"version {version}: {layout.TOMBSTONES} is not a .npy file: {exc}") from None
    if arr.ndim != 1 or arr.dtype != np.int64 or (len(arr) > 1 and not (np.diff(arr) > 0).all()):
        raise RagindexError(f"version {version}: {layout.TOMBSTONES} must be sorted distinct int64 row ids, "
                            f"found {arr.dtype} {list(arr.shape)}")
    return arr


def load_shard(fs: Any, path: str) -> np.ndarray:
    """A whole embedding shard: memory-mapped locally (only touched pages become resident), else read."""
    if is_local(fs):
        return np.load(path, mmap_mode="r")
    with fs.open(path, "rb") as f:
        return np.load(f)


@dataclass
class EmbeddingShards:
    """The embedding shards of one directory, checked for consistency, read one at a time."""

    fs: Any
    directory: str
    names: list[str]
    rows: list[int]
    dim: int
    summary: EmbeddingsSummary
    fingerprint: EncoderFingerprint
    offsets: list[int] = field(default_factory=list)
    paths: list[str] | None = None  # where each shard is read from, when not `directory`/name (verified copies)

    def __post_init__(self) -> None:
        self.offsets = [0, *np.cumsum(self.rows).tolist()]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def path(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else join(self.directory, self.names[i])

    def read(self, i: int) -> np.ndarray:
        return load_shard(self.fs, self.path(i))

    def iter(self, progress: bool = False, desc: str = "shards") -> Iterator[tuple[int, np.ndarray]]:
        for i in tqdm(range(len(self.names)), desc=desc, unit="shard", disable=None if progress else True):
            yield self.offsets[i], self.read(i)

    def blocks(self, progress: bool = False, desc: str = "shards") -> Iterator[tuple[int, np.ndarray]]:
        """(first row id, float32 contiguous block) over all shards in row order, at most 65536 rows each."""
        for start, arr in self.iter(progress, desc):
            for lo in range(0, len(arr), _BLOCK):
                yield start + lo, np.ascontiguousarray(arr[lo: lo + _BLOCK], dtype=np.float32)

    def gather(self, row_ids: np.ndarray) -> np.ndarray:
        """Vectors of the given global row ids, in the given order, reading only the shards needed."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        out = np.empty((len(row_ids), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, row_ids, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.nonzero(shard_of == i)[0]
            out[sel] = read_rows(self.fs, self.path(int(i)), row_ids[sel] - self.offsets[i], self.dim)
        return out


def open_embeddings(where: Location) -> EmbeddingShards:
    """Open an embeddings directory and check its summary, sidecars and shard shapes agree."""
    fs, directory, url = where.fs, where.path, where.url
    summary = EmbeddingsSummary.read(fs, join(directory, layout.EMBEDDINGS_SUMMARY))
    fingerprint, dim = summary.fingerprint, summary.dim
    names, rows = [], []
    for shard in summary.shards:
        name = shard.name
        path = join(directory, name)
        try:
            with fs.open(path, "rb") as f:
                shape, _, dtype = read_npy_header(f, path)
        except FileNotFoundError:
            raise RagindexError(f"embedding shard {path} is missing") from None
        sidecar = EmbeddingSidecar.read(fs, join(directory, layout.sidecar(name)))
        if sidecar.fingerprint_key != fingerprint.key:
            raise RagindexError(
                f"{name} was encoded by encoder {sidecar.fingerprint_key}, not {fingerprint.key}: "
                "embeddings from different encoders cannot share an index"
            )
        if len(shape) != 2 or shape[1] != dim or dtype != np.float32:
            raise RagindexError(f"{name} holds {dtype} {shape}, expected float32 [rows, {dim}]")
        if shape[0] != sidecar.rows or shape[0] != shard.rows:
            raise RagindexError(f"{name} has {shape[0]} rows but its records say {sidecar.rows}")
        names.append(name)
        rows.append(shape[0])
    where = f"{url}/{layout.EMBEDDINGS_SUMMARY}"
    if not names:
        raise RagindexError(f"no embedding shards listed in {where}")
    if sum(rows) != summary.rows:
        raise RagindexError(f"{url}: shards hold {sum(rows)} rows, {layout.EMBEDDINGS_SUMMARY} says {summary.rows}")
    if fingerprint.dim != dim:
        raise RagindexError(f"{url}: encoder fingerprint says dim {fingerprint.dim}, shards have {dim}")
    return EmbeddingShards(fs, directory, names, rows, dim, summary, fingerprint)


def verified_embeddings(pins: Pins, store: IndexStore, manifest: Manifest) -> EmbeddingShards:
    """A committed version's embedding shards, each file checked against its manifest (`Pins.version_file`)
    before it is read; their shapes were checked when that version was validated."""
    local = LocalFileSystem()
    summary = EmbeddingsSummary.read(local, pins.version_file(store, manifest,
                                                                layout.EMBEDDINGS_SUMMARY_PATH))
    paths = [pins.version_file(store, manifest, f"{layout.EMBEDDINGS_DIR}/{shard.name}")
             for shard in summary.shards]
    return EmbeddingShards(local, store.version_path(manifest.version, layout.EMBEDDINGS_DIR),
                           [shard.name for shard in summary.shards], [shard.rows for shard in summary.shards],
                           summary.dim, summary, summary.fingerprint, paths=paths)


def exact_search(shards: EmbeddingShards, queries: np.ndarray, k: int,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product over all shards, streaming: (scores [n, k'], ids [n, k']), k' = min(k, rows)."""
    k = min(k, shards.total)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    blocks = (block for _, block in shards.blocks(progress, desc="exact search"))
    # A block smaller than k pads with -1 ids at the lowest score; with k <= rows they never survive.
    scores, ids = knn_ground_truth(queries, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT)
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def exact_search_blocks(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]],
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product over (row ids, vectors) blocks that need not be contiguous (a delta
    version's live rows across segments): (scores [n, k], ids [n, k]), -1 / -inf where fewer exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for row_ids, vectors in blocks:
        if not len(row_ids):
            continue
        scores, local = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(row_ids)),
                                  metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(local >= 0, np.asarray(row_ids, dtype=np.int64)[local], -1))
    heap.finalize()
    ids = heap.I.astype(np.int64, copy=False)
    return np.where(ids < 0, np.float32(-np.inf), heap.D).astype(np.float32), ids


def recall_at_k(found: np.ndarray, gt_ids: np.ndarray, gt_scores: np.ndarray, k: int = TUNE_K) -> float:
    """Fraction of the exact top-k found, counting an id tied with the k-th exact score as found."""
    k = min(k, gt_ids.shape[1])
    if k == 0:
        return 1.0
    hits = 0
    for row in range(len(found)):
        threshold = gt_scores[row, k - 1] - 1e-4 * max(1.0, abs(float(gt_scores[row, k - 1])))
        good = set(gt_ids[row][gt_scores[row] >= threshold].tolist())
        hits += min(k, len(good.intersection(found[row, :k].tolist())))
    return hits / (len(found) * k)


def sample_rows(total: int, n: int, seed: int) -> np.ndarray:
    """n distinct row ids out of `total`, sorted, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False))
