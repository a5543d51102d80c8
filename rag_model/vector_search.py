"""Read a version's FAISS index (memory-mapped where faiss can) and search it the way it was built.

Serving and validation both go through `search`, so every index convention lives here once: tuned
search parameters (nprobe / efSearch) and DPR's inner-product-as-L2 trick for HNSW indexes (an extra
dimension sqrt(phi - ||d||^2) on the stored vectors, 0 on the query). Knows nothing of Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import faiss
import numpy as np

from storage.cache import FileCache, store_root_url
from storage.errors import NotFound
from storage.location import Location
from storage.manifest import IndexInfo

log = logging.getLogger(__name__)

# Index types whose searches ignore some parameter names; ParameterSpace raises on unknown ones.
_PARAM_NAMES = ("nprobe", "efSearch", "quantizer_efSearch", "ht", "k_factor")


def read_index(
    where: Location,
    *,
    mmap: bool = True,
    cache_dir: str | None = None,
    sha256: str | None = None,
    cache: FileCache | None = None,
) -> faiss.Index:
    """Open an index file, memory-mapped so that a swap does not double resident memory.

    Flat codes (IndexFlat*, the storage of IndexHNSWFlat) map with IO_FLAG_MMAP_IFC, inverted lists
    with IO_FLAG_MMAP; anything else is read normally. The file is reached through the one local
    cache (`storage.cache`): an S3 index is copied there first; with `sha256` (the manifest's) the
    bytes are verified against it, once per unchanged file. `cache_dir` is the cache's base directory
    when no `cache` is given.
    """
    fs, path = where.fs, where.path
    if not fs.exists(path):
        raise NotFound(f"no index file at {where}")
    if where.is_local and sha256 is None:
        local = path  # nothing to verify against: map it in place
    else:
        config = replace(where.cache, base=cache_dir) if cache_dir else where.cache
        cache = cache or config.for_store(store_root_url(where.url))
        local = cache.verified_path(fs, path, sha256, where.url)
    if not mmap:
        return faiss.read_index(local)
    for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
        flag = getattr(faiss, name, None)
        if flag is None:
            continue
        try:
            index = faiss.read_index(local, flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            continue
        log.info("read %s memory-mapped (%s): %s, %d vectors", where, name, type(index).__name__, index.ntotal)
        return index
    index = faiss.read_index(local)
    log.info("read %s into memory (no mmap support for %s)", where, type(index).__name__)
    return index


def apply_search_params(index: faiss.Index, info: IndexInfo) -> None:
    """Set the tuned nprobe / efSearch on `index` (idempotent; cheap enough to do per search)."""
    params = {k: v for k, v in info.search_params.items() if k in _PARAM_NAMES}
    if "nprobe" in params and "quantizer_efSearch" not in params and hnsw_coarse_quantizer(index) is not None:
        params["quantizer_efSearch"] = coarse_search_width(int(params["nprobe"]))
    if not params:
        return
    faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


def hnsw_coarse_quantizer(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph an IVF index assigns vectors and queries with (`IVF<n>_HNSW<M>`), if it has one."""
    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:
        return None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def coarse_search_width(nprobe: int) -> int:
    """efSearch of an HNSW coarse quantizer asked for nprobe lists: 32 finds the nearest centroid for
    >99.9% of vectors (measured on benchmarks/scale_bench.py's vectors, 8192 lists), and the graph must
    explore at least nprobe."""
    return max(32, 2 * nprobe)


def augment_queries(queries: np.ndarray) -> np.ndarray:
    """The hnsw trick's query side: append a 0 column."""
    return np.hstack([queries, np.zeros((queries.shape[0], 1), dtype=np.float32)])


def augment_vectors(vectors: np.ndarray, phi: float) -> np.ndarray:
    """The hnsw trick's document side: append sqrt(phi - ||d||^2), so ||d'||^2 == phi for all d."""
    norms = np.einsum("ij,ij->i", vectors, vectors)
    extra = np.sqrt(np.maximum(phi - norms, 0.0)).astype(np.float32)
    return np.hstack([vectors.astype(np.float32, copy=False), extra[:, None]])


def search(index: faiss.Index, info: IndexInfo, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores float32 [n, k], row ids int64 [n, k]).

    Missing results (fewer than k vectors reachable) have id -1 and score -inf.
    """
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None, :]
    expected = info.dim - 1 if info.phi is not None else info.dim
    if q.shape[1] != expected:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index expects {expected}")
    apply_search_params(index, info)
    with _threads_for(len(q)):
        if info.phi is not None:
            d2, ids = index.search(augment_queries(q), k)
            # ||q' - d'||^2 = ||q||^2 + phi - 2 q.d  ->  q.d = (||q||^2 + phi - d2) / 2
            qnorm = np.einsum("ij,ij->i", q, q)[:, None]
            scores = ((qnorm + info.phi - d2) / 2).astype(np.float32)
        elif info.metric == "l2":
            d2, ids = index.search(q, k)
            scores = (-d2).astype(np.float32)  # higher is better, like inner products
        else:
            scores, ids = index.search(q, k)
            scores = scores.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    scores = np.where(ids < 0, np.float32(-np.inf), scores).astype(np.float32)
    return scores, ids


@contextmanager
def _threads_for(queries: int) -> Iterator[None]:
    """One OpenMP thread for a single query. faiss parallelises a search over its queries, so a single query
    leaves the rest of the team nothing to do but meet at the region's barrier, and a teammate whose core is
    busy (another process, the encoder, a second request) is waited for: on a 2-core EPYC with one core busy,
    one query through 20k flat rows took 16 ms (p50) with the default two threads and 1.1 ms with one; idle,
    the same either way (`benchmarks/freshness_bench.py` saw it as a 16 ms p99 on every version). The setting
    is the calling thread's own (an OpenMP ICV), so concurrent requests do not race on it."""
    if queries != 1:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
