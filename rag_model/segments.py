"""Search a version made of segments: its own rows plus, for a delta version, its ancestors' rows.

A delta version does not copy its parent. It serves the rows of every version in its lineage
(each version directory holds the rows that version introduced, with its own index over them),
minus the row ids its tombstones drop. A search asks each segment's index for the top k live rows
and merges by score: every index scores by inner product with the same frozen encoder, so scores
from different segments compare directly.

Dropped rows stay in their segment's index (HNSW cannot remove, and rewriting a shared IVF index
would copy the parent): they are excluded after the search, asking the segment for more results
until k live ones come back or the segment has no more. With few tombstones per segment (a day
changes well under 1% of pages) the first ask nearly always suffices.

Small exact segments are searched as one. A delta lineage is a big base plus up to a few dozen deltas
of tens to hundreds of rows; searching such a segment costs a few microseconds in faiss but three times
that in per-call overhead (the call, the tombstone filter, slicing), so 32 of them added ~10% to a query
through a 100k-row base. `SegmentSearch` copies the live rows of the small flat inner-product segments
into one in-memory exact index when the segment list is opened, leaving tombstoned rows out then, so
they are one faiss call with nothing to filter. Only exact indexes are merged that way: the top k of an
exact search over a union is the top k of the union of exact searches, which no approximate index
(IVF lists, an HNSW graph) promises. The copy is bounded (`PACK_MAX_ROWS`) because it is anonymous
memory, where every other index is memory-mapped; big segments gain nothing from it anyway, their
search dwarfs the overhead.

Segments are opened in one place (`rag_model.lineage`), for serving (`rag_model.index`) and
validation (`tasks.lineage_rows`) alike, and both search through `SegmentSearch`, so a delta is
validated exactly as it is served. A segment list is immutable once opened (taking pages down makes a
new one), so its `SegmentSearch` is built once with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from rag_model import vector_search
from rag_model.vectors import EmbeddingShards
from storage.manifest import IndexInfo

_FETCH_ALL_DROPPED = 4  # fetch k + every dropped row while a segment has at most this many per k
# Rows of small exact segments copied into one in-memory index (at most this many in total: at 768
# dimensions, 150 MB of anonymous memory). Deltas of hundreds of rows fit many times over; a segment
# this big is searched on its own at no measurable extra cost.
PACK_MAX_ROWS = 50_000


@dataclass
class Segment:
    """The rows one version directory holds, as a version serving them sees them: row ids
    `first_row_id` .. `first_row_id + rows - 1`, searched through `index`, minus `dropped` (positions,
    row_id - first_row_id, sorted: what the serving version's tombstones drop here).

    What else is open depends on the reader (`rag_model.lineage.open_segments`): serving maps the
    passage table (`batches`), validation reads the parquet passage shards (`passage_files`), and
    either may read the vectors (`embeddings`)."""

    version: str
    first_row_id: int
    rows: int
    index: faiss.Index
    info: IndexInfo
    dropped: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    embeddings: EmbeddingShards | None = None
    batches: list[pa.RecordBatch] = field(default_factory=list)  # passages.arrow, memory-mapped
    passage_files: list[tuple[Any, str]] = field(default_factory=list)  # (filesystem, path) per parquet shard
    batch_starts: np.ndarray = field(init=False)  # position of each record batch's first row

    def __post_init__(self) -> None:
        self.batch_starts = np.cumsum([0] + [b.num_rows for b in self.batches], dtype=np.int64)

    @property
    def live(self) -> int:
        return self.rows - len(self.dropped)

    def live_positions(self) -> np.ndarray:
        keep = np.ones(self.rows, dtype=bool)
        keep[self.dropped] = False
        return np.flatnonzero(keep).astype(np.int64)

    def row(self, position: int) -> dict[str, Any]:
        """One passage of the mapped table (only the touched pages become resident)."""
        batch = int(np.searchsorted(self.batch_starts, position, side="right")) - 1
        return self.batches[batch].slice(position - int(self.batch_starts[batch]), 1).to_pylist()[0]

    def is_dropped(self, positions: np.ndarray) -> np.ndarray:
        if not len(self.dropped):
            return np.zeros(positions.shape, dtype=bool)
        at = np.searchsorted(self.dropped, positions)
        return self.dropped[np.minimum(at, len(self.dropped) - 1)] == positions


def dropped_positions(tombstones: np.ndarray, first_row_id: int, rows: int) -> np.ndarray:
    """The tombstoned positions of a segment, from a version's sorted global tombstones."""
    lo, hi = np.searchsorted(tombstones, [first_row_id, first_row_id + rows])
    return (tombstones[lo:hi] - first_row_id).astype(np.int64)


class SegmentSearch:
    """Top-k live rows over a list of segments by inner product, built once per opened segment list.

    The small exact segments (flat inner-product indexes, `PACK_MAX_ROWS` rows in all, at least two of
    them: one alone saves nothing) are searched as one packed in-memory index over their live rows; every
    other segment (a big base, IVF, HNSW) through its own index, minus its dropped rows. Immutable once
    built, and safe to share between threads (faiss searches do not modify an index)."""

    def __init__(self, segments: list[Segment]) -> None:
        packable = _packable(segments)
        self.packed: faiss.IndexFlatIP | None = None
        self.packed_row_ids = np.empty(0, dtype=np.int64)  # packed position -> global row id
        self.packed_info: IndexInfo | None = None
        if len(packable) >= 2:
            vectors, row_ids = [], []
            for seg in packable:
                live = seg.live_positions()
                vectors.append(seg.index.reconstruct_n(0, seg.rows)[live])
                row_ids.append(live + seg.first_row_id)
            dim = packable[0].index.d
            self.packed = faiss.IndexFlatIP(dim)
            self.packed.add(np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32))
            self.packed_row_ids = np.concatenate(row_ids).astype(np.int64, copy=False)
            self.packed_info = IndexInfo(spec="flat", factory="Flat", dim=dim)
        in_pack = {id(seg) for seg in packable} if self.packed is not None else set()
        self.unpacked = [seg for seg in segments if id(seg) not in in_pack and seg.live > 0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n, k], global row ids int64 [n, k]), best first; -1 / -inf where fewer than k
        rows are reachable. `queries` is [n, dim] or one [dim] vector."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        parts = [_search_live(s, q, k) for s in self.unpacked]
        if self.packed is not None and self.packed.ntotal:
            parts.append(self._search_packed(q, k))
        if not parts:
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        scores = np.hstack([p[0] for p in parts])
        ids = np.hstack([p[1] for p in parts])
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.hstack([scores, np.full((len(q), pad), -np.inf, dtype=np.float32)])
            ids = np.hstack([ids, np.full((len(q), pad), -1, dtype=np.int64)])
        if len(parts) == 1 and scores.shape[1] == k:
            return scores, ids
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _search_packed(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.packed is not None and self.packed_info is not None
        scores, positions = vector_search.search(self.packed, self.packed_info, q, min(k, self.packed.ntotal))
        # exact search over ntotal >= k rows fills every slot; the guard keeps a -1 a -1 regardless
        return scores, np.where(positions >= 0, self.packed_row_ids[np.maximum(positions, 0)], -1)


def _packable(segments: list[Segment]) -> list[Segment]:
    """The segments whose live rows go into the packed index: exact inner-product ones, smallest first
    (more segments packed is more overhead saved) while their rows fit `PACK_MAX_ROWS`, of one dimension."""
    exact = [s for s in segments if s.live > 0 and _is_exact_ip(s)]
    chosen: list[Segment] = []
    total = 0
    for seg in sorted(exact, key=lambda s: s.rows):
        if total + seg.rows > PACK_MAX_ROWS:
            break
        if chosen and seg.index.d != chosen[0].index.d:
            continue
        chosen.append(seg)
        total += seg.rows
    return chosen


def _is_exact_ip(seg: Segment) -> bool:
    index = faiss.downcast_index(seg.index)
    return (isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT
            and seg.info.metric == "ip" and seg.info.phi is None and index.ntotal == seg.rows)


def _search_live(seg: Segment, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to k live rows of one segment per query, as global row ids, best first."""
    want = min(k, seg.live)
    dropped = len(seg.dropped)
    if not dropped:  # nothing to filter: the index's own answer is the answer
        scores, positions = vector_search.search(seg.index, seg.info, q, want)
        return scores, np.where(positions >= 0, positions + seg.first_row_id, -1)
    fetch = min(seg.rows, want + dropped if dropped <= _FETCH_ALL_DROPPED * k else 2 * k)
    while True:
        scores, positions = vector_search.search(seg.index, seg.info, q, fetch)
        keep = (positions >= 0) & ~seg.is_dropped(positions)
        # A query whose answer has holes (-1) has exhausted what its probed lists reach: asking for
        # more cannot find it another live row, so only full answers short of live rows ask again.
        short = (keep.sum(axis=1) < want) & (positions[:, -1] >= 0)
        if fetch >= seg.rows or not short.any():
            break
        fetch = min(seg.rows, 2 * fetch)
    scores = np.where(keep, scores, np.float32(-np.inf))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
    scores = np.take_along_axis(scores, order, axis=1)
    positions = np.take_along_axis(np.where(keep, positions, -1), order, axis=1)
    ids = np.where(positions >= 0, positions + seg.first_row_id, -1)
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
