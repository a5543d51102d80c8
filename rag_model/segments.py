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

Serving (`rag_model.index`) and validation (`tasks.validate`) both search through `search_segments`,
so a delta is validated exactly as it is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from rag_model import vector_search
from storage.manifest import IndexInfo

_FETCH_ALL_DROPPED = 4  # fetch k + every dropped row while a segment has at most this many per k


@dataclass
class Segment:
    """One segment as a search sees it. `dropped` holds positions (row_id - first_row_id), sorted."""

    version: str
    first_row_id: int
    rows: int
    index: faiss.Index
    info: IndexInfo
    dropped: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def live(self) -> int:
        return self.rows - len(self.dropped)

    def is_dropped(self, positions: np.ndarray) -> np.ndarray:
        if not len(self.dropped):
            return np.zeros(positions.shape, dtype=bool)
        at = np.searchsorted(self.dropped, positions)
        return self.dropped[np.minimum(at, len(self.dropped) - 1)] == positions


def dropped_positions(tombstones: np.ndarray, first_row_id: int, rows: int) -> np.ndarray:
    """The tombstoned positions of a segment, from a version's sorted global tombstones."""
    lo, hi = np.searchsorted(tombstones, [first_row_id, first_row_id + rows])
    return (tombstones[lo:hi] - first_row_id).astype(np.int64)


def search_segments(segments: list[Segment], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k live rows over all segments by inner product: (scores float32 [n, k], row ids int64 [n, k]);
    -1 / -inf where fewer than k rows are reachable."""
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None, :]
    parts = [_search_live(s, q, k) for s in segments if s.live > 0]
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


def _search_live(seg: Segment, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to k live rows of one segment per query, as global row ids, best first."""
    want = min(k, seg.live)
    dropped = len(seg.dropped)
    fetch = min(seg.rows, want + dropped if dropped <= _FETCH_ALL_DROPPED * k else 2 * k)
    while True:
        scores, positions = vector_search.search(seg.index, seg.info, q, fetch)
        keep = (positions >= 0) & ~seg.is_dropped(positions)
        # A query whose answer has holes (-1) has exhausted what its probed lists reach: asking for
        # more cannot find it another live row, so only full answers short of live rows ask again.
        short = (keep.sum(axis=1) < want) & (positions[:, -1] >= 0)
        if not dropped or fetch >= seg.rows or not short.any():
            break
        fetch = min(seg.rows, 2 * fetch)
    if dropped:
        scores = np.where(keep, scores, np.float32(-np.inf))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
        scores = np.take_along_axis(scores, order, axis=1)
        positions = np.take_along_axis(np.where(keep, positions, -1), order, axis=1)
    else:
        scores, positions = scores[:, :want], positions[:, :want]
    ids = np.where(positions >= 0, positions + seg.first_row_id, -1)
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
