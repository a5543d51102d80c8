"""Searching a version made of segments minus tombstones: the same answers as exact search over its live rows,
whether a segment is searched through its own index or packed with the other small exact ones."""

from __future__ import annotations

import faiss
import numpy as np

from rag_model import segments as segments_module
from rag_model import vector_search
from rag_model.segments import Segment, SegmentSearch, dropped_positions
from rag_model.vectors import exact_search_blocks
from storage.location import Location
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

    scores, ids = SegmentSearch(segs).search(queries, 10)

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
    _, ids = SegmentSearch([seg]).search(rng.standard_normal((50, DIM), dtype=np.float32), 40)

    assert not np.isin(ids[ids >= 0], tombstones).any()
    assert max(calls) < 2000 and len(calls) <= 3


def _hnsw(vectors: np.ndarray) -> tuple[faiss.Index, IndexInfo]:
    """The hnsw inner-product trick as built: an extra dimension on the stored vectors, none on queries."""
    phi = float(np.einsum("ij,ij->i", vectors, vectors).max())
    index = faiss.IndexHNSWFlat(DIM + 1, 16, faiss.METRIC_L2)
    index.add(vector_search.augment_vectors(vectors, phi))
    return index, IndexInfo(spec="hnsw", factory="HNSW16", metric="ip", dim=DIM + 1, phi=phi,
                            search_params={"efSearch": 256})


def _lineage(rng: np.random.Generator, small: list[int]) -> tuple[list[Segment], list[np.ndarray], np.ndarray]:
    """A 400-row flat base and flat deltas of `small` rows, with tombstones in the base and in the deltas:
    (segments, each segment's vectors, the sorted tombstoned row ids)."""
    sizes = [400, *small]
    firsts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    vectors = [rng.standard_normal((n, DIM), dtype=np.float32) for n in sizes]
    dropped = [np.arange(0, 400, 7)]  # the base
    for i, n in enumerate(small):
        dropped.append(np.arange(n) if i == 2 else rng.choice(n, n // 4, replace=False))  # the third: all of it
    tombstones = np.sort(np.concatenate([d + f for d, f in zip(dropped, firsts, strict=True)])).astype(np.int64)
    segs = [Segment(f"v{i}", int(f), n, *_flat(v), dropped=dropped_positions(tombstones, int(f), n))
            for i, (f, n, v) in enumerate(zip(firsts, sizes, vectors, strict=True))]
    return segs, vectors, tombstones


def _exact(segs: list[Segment], vectors: list[np.ndarray], queries: np.ndarray, k: int):
    blocks = [(s.live_positions() + s.first_row_id, v[s.live_positions()]) for s, v in zip(segs, vectors, strict=True)]
    return exact_search_blocks(queries, blocks, k)


def test_small_flat_segments_are_packed_into_one_index_of_their_live_rows():
    rng = np.random.default_rng(3)
    segs, vectors, tombstones = _lineage(rng, [30, 12, 20, 45, 8, 60, 25, 33])
    search = SegmentSearch(segs)

    # the base as well (400 rows fit PACK_MAX_ROWS), and not the fully tombstoned delta: nothing of it is live
    live = sum(s.live for s in segs)
    assert search.packed is not None and search.packed.ntotal == live
    assert not np.isin(search.packed_row_ids, tombstones).any()
    assert search.unpacked == []

    queries = rng.standard_normal((20, DIM), dtype=np.float32)
    for k in (1, 10, live + 17):  # more than the live rows: the tail is padded
        scores, ids = search.search(queries, k)
        want_s, want_i = _exact(segs, vectors, queries, min(k, live))
        np.testing.assert_array_equal(ids[:, :min(k, live)], want_i)
        np.testing.assert_allclose(scores[:, :min(k, live)], want_s, rtol=1e-5)
        assert (ids[:, live:] == -1).all() and np.isneginf(scores[:, live:]).all()


def test_a_big_base_is_searched_through_its_own_index_and_merged_with_the_packed_deltas(monkeypatch):
    rng = np.random.default_rng(4)
    monkeypatch.setattr(segments_module, "PACK_MAX_ROWS", 300)  # the 400-row base does not fit
    segs, vectors, tombstones = _lineage(rng, [30, 12, 20, 45, 8, 60, 25, 33])
    search = SegmentSearch(segs)

    assert search.unpacked == [segs[0]]
    packed_live = sum(s.live for s in segs[1:])
    assert search.packed is not None and search.packed.ntotal == packed_live

    queries = rng.standard_normal((20, DIM), dtype=np.float32)
    for k in (10, packed_live + 5):  # more than the packed live rows: the base fills the rest
        scores, ids = search.search(queries, k)
        want_s, want_i = _exact(segs, vectors, queries, k)
        assert not np.isin(ids, tombstones).any()
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-5)

    one = search.search(queries[0], 10)  # a single query as a 1-D vector
    np.testing.assert_array_equal(one[1], search.search(queries[:1], 10)[1])
    assert one[0].shape == (1, 10) and one[0].dtype == np.float32 and one[1].dtype == np.int64


def test_one_small_segment_alone_is_searched_through_its_own_index():
    rng = np.random.default_rng(5)
    segs, vectors, _ = _lineage(rng, [])
    search = SegmentSearch(segs)
    assert search.packed is None and search.unpacked == segs
    queries = rng.standard_normal((5, DIM), dtype=np.float32)
    scores, ids = search.search(queries, 10)
    want_s, want_i = _exact(segs, vectors, queries, 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5)


def test_approximate_small_segments_are_not_packed_but_searched_right():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((600, DIM), dtype=np.float32)
    ivf_rows = rng.standard_normal((80, DIM), dtype=np.float32)
    hnsw_rows = rng.standard_normal((50, DIM), dtype=np.float32)
    flat_rows = [rng.standard_normal((n, DIM), dtype=np.float32) for n in (20, 30)]
    tombstones = np.sort(np.concatenate([np.arange(0, 600, 11), 600 + np.arange(0, 80, 9), 680 + np.arange(0, 50, 6),
                                         730 + np.arange(3)])).astype(np.int64)
    parts = [(0, 600, _flat(base)), (600, 80, _ivf(base, ivf_rows, nlist=4, nprobe=4)), (680, 50, _hnsw(hnsw_rows)),
             (730, 20, _flat(flat_rows[0])), (750, 30, _flat(flat_rows[1]))]
    segs = [Segment(f"v{i}", f, n, *ix, dropped=dropped_positions(tombstones, f, n))
            for i, (f, n, ix) in enumerate(parts)]
    search = SegmentSearch(segs)

    assert search.unpacked == segs[1:3]  # IVF (every list probed) and HNSW: on their own; the flat ones packed
    assert search.packed is not None and search.packed.ntotal == sum(s.live for s in segs[:1] + segs[3:])

    queries = rng.standard_normal((15, DIM), dtype=np.float32)
    scores, ids = search.search(queries, 10)
    want_s, want_i = _exact(segs, [base, ivf_rows, hnsw_rows, *flat_rows], queries, 10)
    assert not np.isin(ids, tombstones).any()
    np.testing.assert_array_equal(ids, want_i)  # IVF with every list probed and a small HNSW graph are exact here
    np.testing.assert_allclose(scores, want_s, rtol=1e-4)


def test_a_segment_without_dropped_rows_gives_the_same_answer_as_with_an_empty_filter():
    """The fast path for a segment with no tombstones returns exactly what the filtering path returns."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((500, DIM), dtype=np.float32)
    index, info = _ivf(vectors, vectors, nlist=16, nprobe=2)  # holes (-1) where a probe runs out
    clean = Segment("a", 100, 500, index, info)
    queries = rng.standard_normal((30, DIM), dtype=np.float32)
    fast = segments_module._search_live(clean, queries, 60)
    # a dropped position past the end filters nothing but takes the filtering path
    filtered = segments_module._search_live(Segment("a", 100, 501, index, info, dropped=np.array([500])), queries, 60)
    np.testing.assert_array_equal(fast[1], filtered[1])
    np.testing.assert_array_equal(fast[0], filtered[0])


def test_flat_segments_read_memory_mapped_are_packed(tmp_path):
    """Served indexes are memory-mapped (`read_index`): their vectors are read back for the pack all the same."""
    rng = np.random.default_rng(8)
    vectors = [rng.standard_normal((n, DIM), dtype=np.float32) for n in (40, 25)]
    segs = []
    for i, (first, v) in enumerate(zip((0, 40), vectors, strict=True)):
        path = tmp_path / f"{i}.faiss"
        faiss.write_index(_flat(v)[0], str(path))
        index = vector_search.read_index(Location(str(path)))
        segs.append(Segment(f"v{i}", first, len(v), index, _flat(v)[1], dropped=np.array([1, 3], dtype=np.int64)))
    search = SegmentSearch(segs)
    assert search.packed is not None and search.packed.ntotal == 61 and search.unpacked == []

    queries = rng.standard_normal((6, DIM), dtype=np.float32)
    scores, ids = search.search(queries, 10)
    want_s, want_i = _exact(segs, vectors, queries, 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5)
