"""Index building: specs, ids == row ids, the 769-d HNSW trick, memory refusals, passage table, reading back."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from rag_model.vector_search import read_index, search
from storage.errors import RagindexError, Rejected
from storage.layout import TABLE_COLUMNS
from storage.store import IndexStore
from tasks import build_index as bi
from tasks.passage_table import write_passage_table
from tests.fixtures.versions import clustered_vectors, fingerprint_for, random_passages, write_version_inputs


def staged(store: IndexStore, vectors: np.ndarray, shard_rows: int = 500) -> str:
    vid = store.begin_version("enwiki", "20240101")
    write_version_inputs(store, vid, random_passages(len(vectors)), vectors, fingerprint_for(vectors.shape[1]),
                         shard_rows=shard_rows)
    return vid


def build(store, vid, spec, **kw):
    info = bi.build_index(store.at(vid, "embeddings"), store.at(vid, "index.faiss"), spec=spec, progress=False, **kw)
    return info, read_index(store.at(vid, "index.faiss"))


def exact_top(vectors, queries, k):
    scores = queries @ vectors.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_every_spec_maps_faiss_ids_to_row_ids(store):
    vectors = clustered_vectors(1200, 24, seed=1)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # so every vector is its own best match
    vid = staged(store, vectors, shard_rows=300)  # 4 shards: ids must run on across shard boundaries
    probe_rows = np.array([0, 299, 300, 777, 1199])
    for spec in ("flat", "hnsw", "ivfsq", "IVF4,Flat", "HNSW16"):
        info, index = build(store, vid, spec)
        assert index.ntotal == 1200 and info.params["ntotal"] == 1200 and info.bytes > 0
        scores, ids = search(index, info, vectors[probe_rows], 3)
        assert ids[:, 0].tolist() == probe_rows.tolist(), spec
        expected = np.einsum("ij,ij->i", vectors[probe_rows], vectors[probe_rows])
        np.testing.assert_allclose(scores[:, 0], expected, rtol=2e-2)  # inner products, whatever the index
        assert info.params["tuned_recall_at_10"] >= 0.95, (spec, info)


def test_hnsw_trick_769_dims_returns_exact_inner_product_top10(tmp_path):
    rng = np.random.default_rng(7)
    # DPR-like: clustered, unnormalised vectors whose norms vary, so L2 on the raw vectors ranks differently.
    scale = rng.uniform(0.6, 1.4, size=(1500, 1)).astype(np.float32)
    vectors = clustered_vectors(1500, 768, seed=7, clusters=30) * scale
    store = IndexStore(str(tmp_path / "store"))
    vid = staged(store, vectors, shard_rows=600)
    info, index = build(store, vid, "hnsw")
    assert info.dim == 769 and info.metric == "l2" and index.d == 769
    assert info.phi == pytest.approx(float(np.einsum("ij,ij->i", vectors, vectors).max()), rel=1e-5)
    queries = vectors[rng.choice(1500, 50, replace=False)] + 0.3 * rng.normal(size=(50, 768)).astype(np.float32)
    raw_l2 = faiss.IndexFlatL2(768)
    raw_l2.add(vectors)
    assert np.mean(raw_l2.search(queries, 10)[1] == exact_top(vectors, queries, 10)) < 0.9  # the trick matters
    info.search_params = {"efSearch": 512}
    scores, ids = search(index, info, queries, 10)
    exact = exact_top(vectors, queries, 10)
    same = np.mean([set(a) == set(b) for a, b in zip(ids.tolist(), exact.tolist(), strict=True)])
    assert same >= 0.98
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, ids, 1), rtol=1e-3, atol=1e-2)


def test_auto_compresses_large_sets_and_reaches_target_recall(tmp_path, monkeypatch):
    monkeypatch.setattr(bi, "AUTO_FLAT_MAX", 2_000)  # exercise the IVF path at test scale
    vectors = clustered_vectors(6000, 32, seed=3, clusters=60)
    store = IndexStore(str(tmp_path / "store"))
    vid = staged(store, vectors, shard_rows=2000)
    info, index = build(store, vid, "auto", target_recall=0.95)
    assert info.factory.startswith("IVF") and "nprobe" in info.search_params
    assert info.params["tuned_recall_at_10"] >= 0.95
    assert info.params["bytes_per_vector"] < 32 * 4  # smaller than flat
    queries = vectors[::97] + 0.01
    _, ids = search(index, info, queries, 10)
    exact = exact_top(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.9
    small = staged(store, vectors[:500])
    assert build(store, small, "auto")[0].factory == "Flat"


def test_in_memory_specs_are_refused_up_front_when_over_budget(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    vid = staged(store, clustered_vectors(1000, 64))
    for spec in ("flat", "hnsw"):
        with pytest.raises(Rejected, match=r"needs about .* memory budget is"):
            build(store, vid, spec, memory_budget=100_000)
    with pytest.raises(Rejected, match="needs about"):
        build(store, vid, "auto", memory_budget=10_000)
    assert not store.fs.exists(store.version_path(vid, "index.faiss"))


def test_bad_specs_and_mixed_encoders_are_one_line_errors(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    vid = staged(store, clustered_vectors(300, 16))
    for spec in ("nonsense", "hnsw:M=x", "ivfsq:bits=5", "hnsw:colour=red"):
        with pytest.raises(Rejected) as err:
            build(store, vid, spec)
        assert "\n" not in str(err.value)
    # A shard encoded by another model must not be mixed in.
    sidecar = store.version_path(vid, "embeddings", "part-00000.json")
    text = store.fs.cat_file(sidecar).decode().replace(fingerprint_for(16).key, "0" * 16)
    store.fs.pipe_file(sidecar, text.encode())
    with pytest.raises(RagindexError, match="different encoders"):
        build(store, vid, "flat")


def test_passage_table_is_a_mappable_arrow_file_in_row_order(store, tmp_path):
    passages = random_passages(700)
    vid = store.begin_version("enwiki", "20240101")
    write_version_inputs(store, vid, passages, clustered_vectors(700, 8), fingerprint_for(8), shard_rows=256)
    rows = write_passage_table(store.at(vid, "passages"), store.at(vid, "passages.arrow"))
    assert rows == 700
    local = tmp_path / "passages.arrow"
    store.fs.get_file(store.version_path(vid, "passages.arrow"), str(local))
    table = pa.ipc.open_file(pa.memory_map(str(local))).read_all()
    assert table.column_names == list(TABLE_COLUMNS)
    assert table.column("row_id").to_pylist() == list(range(700))
    assert table.column("title").to_pylist()[450] == passages[450]["title"]
    assert table.column("text").to_pylist()[699] == passages[699]["text"]


def test_read_index_memory_maps_local_and_caches_s3(store, tmp_path):
    vectors = clustered_vectors(400, 16)
    vid = staged(store, vectors)
    info, _ = build(store, vid, "flat")
    cache = tmp_path / "cache"
    a = read_index(store.at(vid, "index.faiss"), cache_dir=str(cache))
    b = read_index(store.at(vid, "index.faiss"), mmap=False, cache_dir=str(cache))
    assert isinstance(a, faiss.IndexFlatIP) and a.ntotal == b.ntotal == 400
    assert np.array_equal(search(a, info, vectors[:5], 5)[1], search(b, info, vectors[:5], 5)[1])
    cached = list(cache.rglob("index.faiss"))
    assert len(cached) == (0 if store.s3_endpoint_url is None else 1)
    with pytest.raises(RagindexError):
        read_index(store.at(vid, "missing.faiss"))


def test_a_second_build_of_the_same_fingerprint_reuses_the_trained_index_another_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(bi, "AUTO_FLAT_MAX", 2_000)  # exercise the IVF path at test scale
    store = IndexStore(str(tmp_path / "store"))
    trained = store.location.child("trained")
    vectors = clustered_vectors(6000, 32, seed=3, clusters=60)
    first = staged(store, vectors, shard_rows=2000)
    for spec in ("auto", "ivfsq:nlist=32"):
        info, _ = build(store, first, spec, trained=trained)
        assert info.params["quantizer_reused"] is False and info.params["train_s"] > 0
        # The next version of the same encoder: slightly different vectors, same fingerprint.
        second = staged(store, vectors + 0.01 * clustered_vectors(6000, 32, seed=4, clusters=60), shard_rows=2000)
        again, index = build(store, second, spec, trained=trained)
        assert again.params["quantizer_reused"] is True and again.params["train_s"] == 0.0
        assert again.factory == info.factory and again.params["tuned_recall_at_10"] >= 0.95
        assert again.params["trained_sha256"] and index.ntotal == 6000
    # Another encoder (another fingerprint key) never starts from them.
    other = store.begin_version("enwiki", "20240101")
    write_version_inputs(store, other, random_passages(6000), vectors, fingerprint_for(32, model_id="test/other"),
                         shard_rows=2000)
    info, _ = build(store, other, "auto", trained=trained)
    assert info.params["quantizer_reused"] is False


def test_a_stored_trained_index_that_does_not_verify_is_retrained_and_replaced(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    trained = store.location.child("trained")
    vectors = clustered_vectors(3000, 32, seed=5, clusters=40)
    vid = staged(store, vectors, shard_rows=1000)
    build(store, vid, "ivfsq:nlist=16", trained=trained)
    [faiss_file] = (tmp_path / "store" / "trained").rglob("*.faiss")
    assert faiss_file.name == "IVF16_SQ8.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # no longer what its record's sha256 says
    faiss_file.write_bytes(bytes(data))
    info, _ = build(store, vid, "ivfsq:nlist=16", trained=trained)
    assert info.params["quantizer_reused"] is False
    info, _ = build(store, vid, "ivfsq:nlist=16", trained=trained)  # the replacement verifies
    assert info.params["quantizer_reused"] is True


def test_a_reused_trained_index_that_misses_the_target_recall_is_retrained_and_replaced(tmp_path):
    store = IndexStore(str(tmp_path / "store"))
    trained = store.location.child("trained")
    spec = "ivfpq:nlist=8,m=8,nbits=6"
    # PQ codebooks trained on data a thousand times larger: every vector of the next version encodes alike.
    huge = staged(store, 1000 * clustered_vectors(3000, 32, seed=6, clusters=40), shard_rows=1000)
    build(store, huge, spec, trained=trained, target_recall=0.5)
    vid = staged(store, clustered_vectors(3000, 32, seed=7, clusters=40), shard_rows=1000)
    # PQ6 on 32-d reaches ~0.5 when trained on its own data, ~0.03 with the foreign codebooks.
    info, _ = build(store, vid, spec, trained=trained, target_recall=0.45)
    assert info.params["quantizer_reused"] is False and info.params["retrained_after_reused_recall"] < 0.2
    assert info.params["tuned_recall_at_10"] >= 0.45
    again, _ = build(store, vid, spec, trained=trained, target_recall=0.45)
    assert again.params["quantizer_reused"] is True  # the entry now holds what the retraining produced


def test_large_inverted_files_assign_through_an_hnsw_coarse_quantizer(tmp_path, monkeypatch):
    from rag_model.vector_search import apply_search_params, hnsw_coarse_quantizer
    from tasks import index_spec

    monkeypatch.setattr(bi, "AUTO_FLAT_MAX", 2_000)
    monkeypatch.setattr(index_spec, "HNSW_COARSE_MIN_NLIST", 16)  # what 8192 lists do at scale, here at 6000 rows
    vectors = clustered_vectors(6000, 32, seed=5, clusters=60)
    store = IndexStore(str(tmp_path / "store"))
    vid = staged(store, vectors, shard_rows=2000)
    info, index = build(store, vid, "auto", target_recall=0.95)
    assert "_HNSW32," in info.factory and info.params["tuned_recall_at_10"] >= 0.95
    coarse = hnsw_coarse_quantizer(index)
    assert coarse is not None and coarse.ntotal == info.params["nlist"]
    apply_search_params(index, info)
    assert coarse.hnsw.efSearch >= info.search_params["nprobe"]  # the graph explores at least nprobe lists
    queries = vectors[::97] + 0.01
    _, ids = search(index, info, queries, 10)
    exact = exact_top(vectors, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist(), strict=True)]) >= 0.9
    assert hnsw_coarse_quantizer(build(store, vid, "flat")[1]) is None
    assert index_spec.ivf_prefix(8) == "IVF8" and index_spec.ivf_prefix(16) == "IVF16_HNSW32"


def test_a_single_query_is_searched_on_one_thread_and_a_batch_on_every_thread():
    """A lone query cannot use a second OpenMP thread (faiss splits searches by query), only wait for it."""
    import threading

    from storage.manifest import IndexInfo

    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    seen: list[int] = []

    class Recording:  # the real index, with the thread count its search runs under noted
        def search(self, q, k):
            seen.append(faiss.omp_get_max_threads())
            return index.search(q, k)

    info = IndexInfo(spec="flat", factory="Flat", dim=8)
    queries = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    default = faiss.omp_get_max_threads()
    _, one = search(Recording(), info, queries[0], 3)
    _, batch = search(Recording(), info, queries, 3)
    assert seen == [1, default] and faiss.omp_get_max_threads() == default
    np.testing.assert_array_equal(one[0], batch[0])
    # Another thread's searches leave this thread's setting alone.
    worker = threading.Thread(target=search, args=(Recording(), info, queries[1], 3))
    worker.start()
    worker.join()
    assert seen[-1] == 1 and faiss.omp_get_max_threads() == default
