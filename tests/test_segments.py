"""Searching a version made of segments minus tombstones: the same answers as exact search over its live rows."""

from __future__ import annotations

import faiss
import numpy as np

from rag_model import segments as segments_module
from rag_model.segments import Segment, dropped_positions, search_segments
from rag_model.vectors import exact_search_blocks
from storage.manifest import IndexInfo

DIM = 16


def _flat(vectors: np.ndarray) -> tuple[faiss.Index, IndexInfo]:
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    return index, IndexInfo(spec="flat", factory="Flat", dim=DIM)


def _ivf(train: np.ndarray, vectors: np.ndarray, nlist: int, nprobe: int) -> tuple[faiss.Index, IndexInfo]:
    index = faiss.index_factory(DIM, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    index.add(vectors)
    return index, IndexInfo(spec="ivf", factory=f"IVF{nlist},Flat", dim=DIM, search_params={"nprobe": nprobe})


def test_segments_minus_tombstones_match_exact_search_over_live_rows():
    rng = np.random.default_rng(0)
    base, delta = rng.standard_normal((300, DIM), dtype=np.float32), rng.standard_normal((40, DIM), dtype=np.float32)
    tombstones = np.sort(rng.choice(300, 60, replace=False)).astype(np.int64)
    segs = [Segment("base", 0, 300, *_flat(base), dropped=dropped_positions(tombstones, 0, 300)),
            Segment("delta", 300, 40, *_flat(delta), dropped=dropped_positions(tombstones, 300, 40))]
    queries = rng.standard_normal((25, DIM), dtype=np.float32)

    scores, ids = search_segments(segs, queries, 10)

    live = np.setdiff1d(np.arange(300), tombstones)
    want_s, want_i = exact_search_blocks(queries, [(live, base[live]), (np.arange(300, 340), delta)], 10)
    assert not np.isin(ids, tombstones).any()
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5)


def test_exact_search_blocks_agrees_with_faiss():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((500, DIM), dtype=np.float32)
    queries = rng.standard_normal((7, DIM), dtype=np.float32)
    ids = np.arange(1000, 1500)
    got_s, got_i = exact_search_blocks(queries, [(ids[:200], vectors[:200]), (ids[200:], vectors[200:])], 5)
    want_s, want_i = faiss.knn(queries, vectors, 5, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(got_i, ids[want_i])
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5)


def test_an_exhausted_ivf_probe_does_not_widen_the_search_to_the_whole_segment(monkeypatch):
    """With nprobe=1 a query reaches only its list; when that list runs out, asking for more rows
    cannot help, so the segment is not searched again with an ever larger k."""
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((2000, DIM), dtype=np.float32)
    index, info = _ivf(vectors, vectors, nlist=64, nprobe=1)
    tombstones = np.arange(0, 2000, 3, dtype=np.int64)  # a third of the rows dropped
    seg = Segment("base", 0, 2000, index, info, dropped=tombstones)
    calls: list[int] = []
    real = segments_module.vector_search.search

    def counting(index_, info_, q, k):
        calls.append(k)
        return real(index_, info_, q, k)

    monkeypatch.setattr(segments_module.vector_search, "search", counting)
    _, ids = search_segments([seg], rng.standard_normal((50, DIM), dtype=np.float32), 40)

    assert not np.isin(ids[ids >= 0], tombstones).any()
    assert max(calls) < 2000 and len(calls) <= 3
