"""Build a version's FAISS index and its memory-mappable passage table from the shards in the store.

Embedding shards are read one at a time (memory-mapped locally), vectors are added shard by shard
with faiss ids == global row_id, and trained indexes learn from a random sample. Specs:

- `flat`: exact inner product (IndexFlatIP).
- `hnsw[:M=32,efConstruction=100]`: DPR's trick -- one extra dimension sqrt(phi - ||d||^2) with phi the
  max squared norm, L2 HNSW, queries get a 0 (see rag_model.vector_search); efSearch tuned.
- `ivfpq[:nlist=..,m=..,nbits=8,opq=0]`, `ivfsq[:nlist=..,bits=8]`: trained on a sample, nprobe tuned.
- any faiss factory string (inner-product metric), tuned when it has an nprobe or efSearch.
- `auto`: like autofaiss -- exact Flat for small sets, otherwise the smallest IVF code (SQ4 < SQ6 <
  SQ8 < SQfp16 < Flat) that fits the memory budget and reaches the target recall, nprobe tuned on
  held-out queries against exact search.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from rag_model.vector_search import apply_search_params, augment_vectors, search
from storage.errors import RagindexError, Rejected
from storage.fs import is_local, join, resolve, staged_local_file
from storage.manifest import EncoderFingerprint, IndexInfo

log = logging.getLogger(__name__)

EMBEDDINGS_SUMMARY = "embeddings.json"
PASSAGES_SUMMARY = "passages.json"
TABLE_COLUMNS = ("row_id", "passage_id", "page_id", "rev_id", "title", "text")
TABLE_SCHEMA = pa.schema(
    [("row_id", pa.int64()), ("passage_id", pa.string()), ("page_id", pa.int64()), ("rev_id", pa.int64()),
     ("title", pa.string()), ("text", pa.string())]
)

AUTO_FLAT_MAX = 20_000  # below this brute force is both exact and fast enough
AUTO_CODES = ("SQ4", "SQ6", "SQ8", "SQfp16", "Flat")  # increasing size and fidelity
HNSW_EF_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048)
TUNE_K = 10
GT_K = 50  # exact neighbours kept per query, so that ties at rank 10 are not counted as misses


# -- embedding shards ------------------------------------------------------------------------------


@dataclass
class EmbeddingShards:
    """The embedding shards of one directory, checked for consistency, read one at a time."""

    fs: Any
    directory: str
    names: list[str]
    rows: list[int]
    dim: int
    summary: dict[str, Any]
    fingerprint: EncoderFingerprint
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets = [0, *np.cumsum(self.rows).tolist()]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def read(self, i: int) -> np.ndarray:
        path = join(self.directory, self.names[i])
        if is_local(self.fs):
            arr = np.load(path, mmap_mode="r")
        else:
            with self.fs.open(path, "rb") as f:
                arr = np.load(f)
        return arr

    def iter(self, progress: bool = False, desc: str = "shards") -> Iterator[tuple[int, np.ndarray]]:
        for i in tqdm(range(len(self.names)), desc=desc, unit="shard", disable=None if progress else True):
            yield self.offsets[i], self.read(i)

    def gather(self, row_ids: np.ndarray) -> np.ndarray:
        """Vectors of the given global row ids, in the given order, reading only the shards needed."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        out = np.empty((len(row_ids), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, row_ids, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.nonzero(shard_of == i)[0]
            arr = self.read(int(i))
            out[sel] = arr[row_ids[sel] - self.offsets[i]]
        return out


def open_embeddings(url: str, s3_endpoint_url: str | None = None) -> EmbeddingShards:
    """Open an embeddings directory and check its summary, sidecars and shard shapes agree."""
    fs, directory = resolve(url, s3_endpoint_url)
    summary = _read_json(fs, join(directory, EMBEDDINGS_SUMMARY))
    try:
        fingerprint = EncoderFingerprint.model_validate(summary["fingerprint"])
        dim, shards = int(summary["dim"]), summary["shards"]
    except (KeyError, TypeError, ValueError) as exc:
        raise RagindexError(f"{url}/{EMBEDDINGS_SUMMARY} is missing or has a bad field: {exc}") from None
    names, rows = [], []
    for shard in shards:
        name = shard["name"]
        path = join(directory, name)
        shape, dtype = _npy_header(fs, path)
        sidecar = _read_json(fs, path[: -len(".npy")] + ".json")
        if sidecar.get("fingerprint_key") != fingerprint.key:
            raise RagindexError(
                f"{name} was encoded by encoder {sidecar.get('fingerprint_key')}, not {fingerprint.key}: "
                "embeddings from different encoders cannot share an index"
            )
        if len(shape) != 2 or shape[1] != dim or dtype != np.float32:
            raise RagindexError(f"{name} holds {dtype} {shape}, expected float32 [rows, {dim}]")
        if shape[0] != sidecar.get("rows") or shape[0] != shard.get("rows", shape[0]):
            raise RagindexError(f"{name} has {shape[0]} rows but its records say {sidecar.get('rows')}")
        names.append(name)
        rows.append(shape[0])
    if not names:
        raise RagindexError(f"no embedding shards listed in {url}/{EMBEDDINGS_SUMMARY}")
    if sum(rows) != int(summary.get("rows", sum(rows))):
        raise RagindexError(f"{url}: shards hold {sum(rows)} rows, {EMBEDDINGS_SUMMARY} says {summary['rows']}")
    if fingerprint.dim != dim:
        raise RagindexError(f"{url}: encoder fingerprint says dim {fingerprint.dim}, shards have {dim}")
    return EmbeddingShards(fs, directory, names, rows, dim, summary, fingerprint)


def _npy_header(fs: Any, path: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
    except FileNotFoundError:
        raise RagindexError(f"embedding shard {path} is missing") from None
    except ValueError as exc:
        raise RagindexError(f"{path} is not a .npy file: {exc}") from None
    return shape, dtype


def _read_json(fs: Any, path: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise RagindexError(f"{path} is missing") from None
    except ValueError:
        raise RagindexError(f"{path} is not valid JSON") from None


# -- exact search and recall -----------------------------------------------------------------------


def exact_search(shards: EmbeddingShards, queries: np.ndarray, k: int, progress: bool = False):
    """Exact top-k inner product over all shards, streaming: (scores [n,k], ids [n,k])."""
    n = len(queries)
    best_s = np.full((n, 0), -np.inf, dtype=np.float32)
    best_i = np.full((n, 0), -1, dtype=np.int64)
    for start, arr in shards.iter(progress, desc="exact search"):
        for lo in range(0, len(arr), 65536):
            block = np.asarray(arr[lo: lo + 65536], dtype=np.float32)
            s = queries @ block.T
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
            cand_i = np.concatenate([best_i, part + start + lo], axis=1)
            order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(cand_s, order, 1)
            best_i = np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


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
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


# -- specs and plans -------------------------------------------------------------------------------


@dataclass
class Plan:
    spec: str
    factory: str
    metric: str  # "ip" | "l2" (hnsw trick)
    dim: int  # stored dimension
    params: dict[str, Any]
    in_memory_bytes: int | None = None  # known up front for flat / hnsw


def _parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise Rejected(f"index spec {spec!r}: expected key=value after ':', got {item!r}")
        opts[key.strip()] = value.strip()
    return name.strip().lower(), opts


def _int_opt(opts: dict[str, str], key: str, default: int, spec: str) -> int:
    try:
        return int(opts.pop(key, default))
    except ValueError:
        raise Rejected(f"index spec {spec!r}: {key} must be an integer") from None


def default_nlist(n: int) -> int:
    """About 4*sqrt(n) lists, a power of two, with at least ~39 training points per list."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = max(1, n // 39)
    return int(max(1, min(target, 2 ** int(math.log2(cap)))))


def _pq_m(dim: int, target: int) -> int:
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


def hnsw_bytes(n: int, dim: int, m: int) -> int:
    # vectors + level-0 links (2M) + upper levels (~M/ (M-1) share) + per-node bookkeeping
    return int(n * ((dim + 1) * 4 + 2 * m * 4 * 1.1 + 16))


def plan_index(spec: str, n: int, dim: int) -> Plan:
    """Turn a spec into a concrete factory string and parameters for n vectors of dimension dim."""
    name, opts = _parse_spec(spec)
    if name == "flat" and not opts:
        return Plan(spec, "Flat", "ip", dim, {}, in_memory_bytes=n * dim * 4)
    if name == "hnsw":
        m = _int_opt(opts, "M", 32, spec)
        efc = _int_opt(opts, "efConstruction", 100, spec)
        _no_more(opts, spec)
        return Plan(spec, f"HNSW{m},Flat", "l2", dim + 1, {"M": m, "efConstruction": efc},
                    in_memory_bytes=hnsw_bytes(n, dim, m))
    if name in ("ivfpq", "ivfsq"):
        nlist = _int_opt(opts, "nlist", default_nlist(n), spec)
        if name == "ivfpq":
            m = _int_opt(opts, "m", _pq_m(dim, max(1, dim // 8)), spec)
            nbits = _int_opt(opts, "nbits", 8, spec)
            opq = _int_opt(opts, "opq", 0, spec)
            _no_more(opts, spec)
            if dim % m:
                raise Rejected(f"index spec {spec!r}: m={m} must divide the dimension {dim}")
            # Fewer training points than 2^nbits centroids per sub-quantizer cannot train PQ.
            nbits = max(1, min(nbits, int(math.log2(max(2, n // 39)))))
            factory = f"IVF{nlist},PQ{m}x{nbits}"
            if opq:
                factory = f"OPQ{m}_{dim},{factory}"
            return Plan(spec, factory, "ip", dim, {"nlist": nlist, "m": m, "nbits": nbits, "opq": bool(opq)})
        bits = _int_opt(opts, "bits", 8, spec)
        _no_more(opts, spec)
        if bits not in (4, 6, 8, 16):
            raise Rejected(f"index spec {spec!r}: bits must be 4, 6, 8 or 16")
        code = "SQfp16" if bits == 16 else f"SQ{bits}"
        return Plan(spec, f"IVF{nlist},{code}", "ip", dim, {"nlist": nlist, "code": code})
    if name == "auto":
        raise AssertionError("auto is planned by _build_auto")
    try:
        probe = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        raise Rejected(
            f"index spec {spec!r} is neither auto/flat/hnsw/ivfpq/ivfsq nor a faiss factory string ({first})"
        ) from None
    in_memory = n * dim * 4 if isinstance(probe, faiss.IndexFlat) else None
    return Plan(spec, spec, "ip", dim, {}, in_memory_bytes=in_memory)


def _no_more(opts: dict[str, str], spec: str) -> None:
    if opts:
        raise Rejected(f"index spec {spec!r}: unknown option(s) {', '.join(sorted(opts))}")


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _refuse_if_over(what: str, need: int, budget: int, n: int, dim: int) -> None:
    if need > budget:
        raise Rejected(
            f"index {what} needs about {_fmt_bytes(need)} for {n:,} x {dim} vectors but the memory budget is "
            f"{_fmt_bytes(budget)}: use --index-spec auto (compressed) or raise --memory-budget"
        )


# -- building --------------------------------------------------------------------------------------


def _new_index(plan: Plan) -> faiss.Index:
    if plan.metric == "l2":
        index = faiss.IndexHNSWFlat(plan.dim, plan.params["M"], faiss.METRIC_L2)
        index.hnsw.efConstruction = plan.params["efConstruction"]
        return index
    return faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)


def _train_size(plan: Plan, n: int) -> int:
    nlist = plan.params.get("nlist", 1)
    return int(min(n, max(50 * nlist, 20_000), 262_144))


def _add_all(index: faiss.Index, shards: EmbeddingShards, phi: float | None, progress: bool) -> None:
    with_ids = "IDMap" in type(index).__name__
    for start, arr in shards.iter(progress, desc="adding vectors"):
        for lo in range(0, len(arr), 65536):
            block = np.ascontiguousarray(arr[lo: lo + 65536], dtype=np.float32)
            if phi is not None:
                block = augment_vectors(block, phi)
            if with_ids:
                index.add_with_ids(block, np.arange(start + lo, start + lo + len(block), dtype=np.int64))
            else:
                if index.ntotal != start + lo:
                    raise RagindexError(f"faiss ids out of step with row ids at row {start + lo}")
                index.add(block)


def _max_sq_norm(shards: EmbeddingShards, progress: bool) -> float:
    phi = 0.0
    for _, arr in shards.iter(progress, desc="max norm"):
        for lo in range(0, len(arr), 65536):
            block = np.asarray(arr[lo: lo + 65536], dtype=np.float32)
            phi = max(phi, float(np.einsum("ij,ij->i", block, block).max(initial=0.0)))
    return phi


def _measured_bytes(index: faiss.Index, sample: np.ndarray, n: int) -> int:
    """Extrapolate a trained index's size at n vectors from adding a small sample to a clone."""
    base = faiss.serialize_index(index).nbytes
    probe = faiss.clone_index(index)
    few = sample[: min(len(sample), 2000)]
    probe.add(few)
    per_vector = (faiss.serialize_index(probe).nbytes - base) / max(1, len(few))
    return int(base + per_vector * n)


def _tunable(index: faiss.Index) -> tuple[str, list[int]] | None:
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        return "nprobe", [v for v in (2**i for i in range(20)) if v < ivf.nlist] + [ivf.nlist]
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if hasattr(base, "hnsw"):
        return "efSearch", list(HNSW_EF_LADDER)
    return None


def tune(index: faiss.Index, info: IndexInfo, queries: np.ndarray, gt_s: np.ndarray, gt_i: np.ndarray,
         target_recall: float) -> tuple[dict[str, Any], float]:
    """The cheapest nprobe / efSearch that reaches target_recall on the queries (or the best one tried)."""
    knob = _tunable(index)
    if knob is None:
        _, found = search(index, info, queries, TUNE_K)
        return {}, recall_at_k(found, gt_i, gt_s)
    name, ladder = knob

    def measure(value: int) -> float:
        probe = info.model_copy(update={"search_params": {name: value}})
        _, found = search(index, probe, queries, TUNE_K)
        return recall_at_k(found, gt_i, gt_s)

    lo_fail, chosen, chosen_recall = 0, ladder[-1], -1.0
    for value in ladder:
        r = measure(value)
        if r >= target_recall:
            chosen, chosen_recall = value, r
            break
        lo_fail, chosen_recall = value, r
    else:
        return {name: ladder[-1]}, chosen_recall
    if lo_fail == 0:
        return {name: chosen}, chosen_recall  # the cheapest rung already passes
    # bisect between the last failing and the first passing rung
    lo, hi = lo_fail, chosen
    while hi - lo > max(1, hi // 8):
        mid = (lo + hi) // 2
        r = measure(mid)
        if r >= target_recall:
            hi, chosen_recall = mid, r
        else:
            lo = mid
    return {name: hi}, chosen_recall


def _tuning_queries(shards: EmbeddingShards, n_queries: int, seed: int):
    ids = sample_rows(shards.total, n_queries, seed)
    return ids, shards.gather(ids)


def _build_plan(plan: Plan, shards: EmbeddingShards, budget: int, target_recall: float,
                queries: np.ndarray, gt: tuple[np.ndarray, np.ndarray], progress: bool,
                quantizer: faiss.Index | None = None) -> tuple[faiss.Index, IndexInfo, dict[str, float]]:
    n, dim = shards.total, shards.dim
    timings: dict[str, float] = {}
    if plan.in_memory_bytes is not None:
        _refuse_if_over(plan.spec, plan.in_memory_bytes, budget, n, dim)
    phi = _max_sq_norm(shards, progress) if plan.metric == "l2" else None
    index = _new_index(plan)
    params = dict(plan.params)
    if not index.is_trained:
        t = time.perf_counter()
        sample = shards.gather(sample_rows(n, _train_size(plan, n), seed=1))
        params["train_size"] = len(sample)
        if quantizer is not None:
            _reuse_quantizer(index, quantizer)
        index.train(sample)
        timings["train_s"] = time.perf_counter() - t
        if plan.in_memory_bytes is None:
            _refuse_if_over(plan.spec, _measured_bytes(index, sample, n), budget, n, dim)
        del sample
    t = time.perf_counter()
    _add_all(index, shards, phi, progress)
    timings["add_s"] = time.perf_counter() - t
    info = IndexInfo(spec=plan.spec, factory=plan.factory, metric=plan.metric, dim=plan.dim, params=params,
                     phi=phi)
    t = time.perf_counter()
    search_params, recall = tune(index, info, queries, gt[0], gt[1], target_recall)
    timings["tune_s"] = time.perf_counter() - t
    info.search_params = search_params
    info.params.update({"tuned_recall_at_10": round(recall, 4), "target_recall": target_recall,
                        "tuning_queries": len(queries)})
    return index, info, timings


def _reuse_quantizer(index: faiss.Index, quantizer: faiss.Index) -> None:
    """Give an IVF index an already trained coarse quantizer, so auto trains k-means once."""
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    ivf.quantizer.is_trained = True


def _build_auto(shards: EmbeddingShards, budget: int, target_recall: float, queries: np.ndarray,
                gt: tuple[np.ndarray, np.ndarray], progress: bool):
    n, dim = shards.total, shards.dim
    if n <= AUTO_FLAT_MAX and n * dim * 4 <= budget:
        plan = Plan("auto", "Flat", "ip", dim, {"chosen": "flat: small enough for exact search"},
                    in_memory_bytes=n * dim * 4)
        return _build_plan(plan, shards, budget, target_recall, queries, gt, progress)
    nlist = default_nlist(n)
    code_bytes = {"SQ4": dim / 2, "SQ6": dim * 3 / 4, "SQ8": dim, "SQfp16": 2 * dim, "Flat": 4 * dim}
    fits = [c for c in AUTO_CODES if n * (code_bytes[c] + 8) + nlist * dim * 4 <= budget]
    if not fits:
        _refuse_if_over("auto (smallest code SQ4)", int(n * (code_bytes["SQ4"] + 8)), budget, n, dim)
    # Train the coarse quantizer once; every candidate shares it.
    t = time.perf_counter()
    sample = shards.gather(sample_rows(n, int(min(n, max(50 * nlist, 20_000), 262_144)), seed=1))
    coarse = faiss.IndexFlatIP(dim)
    km = faiss.Clustering(dim, nlist)
    km.niter, km.max_points_per_centroid, km.seed = 10, 256, 1
    km.train(sample, coarse)
    train_s = time.perf_counter() - t
    # Preselect on a subset: quantization loss at exhaustive probing, smallest code first, with margin.
    subset_ids = sample_rows(n, min(n, 50_000), seed=2)
    subset = shards.gather(subset_ids)
    sub_flat = faiss.IndexFlatIP(dim)
    sub_flat.add(subset)
    sub_gt_s, sub_gt_i = sub_flat.search(queries, GT_K)
    tried: list[dict[str, Any]] = []
    margin = min(0.02, (1 - target_recall) / 2)
    start_at = len(fits) - 1
    for pos, code in enumerate(fits):
        probe = faiss.index_factory(dim, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
        _reuse_quantizer(probe, coarse)
        probe.train(sample[:20_000])
        probe.add(subset)
        faiss.extract_index_ivf(probe).nprobe = nlist
        _, found = probe.search(queries, TUNE_K)
        r = recall_at_k(found, sub_gt_i, sub_gt_s)
        tried.append({"code": code, "subset_recall_exhaustive": round(r, 4)})
        if r >= target_recall + margin or code == "Flat":
            start_at = pos
            break
    del subset, sub_flat
    for code in fits[start_at:]:
        plan = Plan("auto", f"IVF{nlist},{code}", "ip", dim,
                    {"nlist": nlist, "code": code, "preselection": tried, "coarse_train_s": round(train_s, 2)})
        index, info, timings = _build_plan(plan, shards, budget, target_recall, queries, gt, progress,
                                           quantizer=coarse)
        if info.params["tuned_recall_at_10"] >= target_recall or code == fits[-1]:
            timings["train_s"] = timings.get("train_s", 0.0) + train_s
            return index, info, timings
        tried.append({"code": code, "full_recall_max_nprobe": info.params["tuned_recall_at_10"]})
        log.info("auto: %s reaches only %.3f recall; trying a larger code", code, info.params["tuned_recall_at_10"])
    raise AssertionError("unreachable")


def build_index(
    embeddings_url: str,
    index_url: str,
    *,
    spec: str = "auto",
    memory_budget: int = 16 * 2**30,
    target_recall: float = 0.95,
    s3_endpoint_url: str | None = None,
    progress: bool = True,
) -> IndexInfo:
    """Build the index for the embedding shards at `embeddings_url` and write it to `index_url`."""
    if not 0 < target_recall <= 1:
        raise Rejected(f"target recall must be in (0, 1], got {target_recall}")
    t0 = time.perf_counter()
    shards = open_embeddings(embeddings_url, s3_endpoint_url)
    n, dim = shards.total, shards.dim
    name, _ = _parse_spec(spec)
    plan = None if name == "auto" else plan_index(spec, n, dim)
    if plan is not None and plan.in_memory_bytes is not None:
        _refuse_if_over(spec, plan.in_memory_bytes, memory_budget, n, dim)  # before reading any vector
    q_ids, queries = _tuning_queries(shards, 500 if n <= 1_000_000 else 200, seed=3)
    t = time.perf_counter()
    gt = exact_search(shards, queries, GT_K, progress)
    gt_s = time.perf_counter() - t
    if plan is None:
        index, info, timings = _build_auto(shards, memory_budget, target_recall, queries, gt, progress)
    else:
        index, info, timings = _build_plan(plan, shards, memory_budget, target_recall, queries, gt, progress)
    apply_search_params(index, info)
    info.bytes = write_faiss_index(index, index_url, s3_endpoint_url)
    info.params.update({k: round(v, 3) for k, v in timings.items()})
    info.params.update({"ground_truth_s": round(gt_s, 3), "build_s": round(time.perf_counter() - t0, 3),
                        "ntotal": int(index.ntotal), "bytes_per_vector": round(info.bytes / max(1, n), 2)})
    log.info("built %s (%s) over %d vectors: %s", spec, info.factory, n, info.search_params)
    return info


def write_faiss_index(index: faiss.Index, url: str, s3_endpoint_url: str | None = None) -> int:
    """Write an index whole or not at all (local temp + rename, or upload of a finished file)."""
    fs, path = resolve(url, s3_endpoint_url)
    with staged_local_file(fs, path) as tmp:
        faiss.write_index(index, tmp)
        size = os.path.getsize(tmp)
    return size


# -- passage table ---------------------------------------------------------------------------------


def passage_shards(fs: Any, directory: str) -> list[str]:
    try:
        found = sorted(p for p in fs.ls(directory, detail=False) if p.rstrip("/").endswith(".parquet"))
    except FileNotFoundError:
        raise RagindexError(f"no passage directory at {directory}") from None
    if not found:
        raise RagindexError(f"no passage shards (part-*.parquet) in {directory}")
    return [p.rstrip("/") for p in found]


def write_passage_table(passages_url: str, table_url: str, s3_endpoint_url: str | None = None) -> int:
    """Write passages.arrow (Arrow IPC file, uncompressed, row i == row_id i) and return its row count."""
    src_fs, src_dir = resolve(passages_url, s3_endpoint_url)
    fs, path = resolve(table_url, s3_endpoint_url)
    rows = 0
    # Exits run inside out: the IPC writer finishes the file before it is published.
    with staged_local_file(fs, path) as tmp, pa.OSFile(tmp, "wb") as sink, \
            pa.ipc.new_file(sink, TABLE_SCHEMA) as writer:
        for shard in passage_shards(src_fs, src_dir):
            with src_fs.open(shard, "rb") as f:
                pf = pq.ParquetFile(f)
                missing = set(TABLE_COLUMNS) - set(pf.schema_arrow.names)
                if missing:
                    raise RagindexError(f"{shard} lacks column(s) {', '.join(sorted(missing))}")
                for batch in pf.iter_batches(batch_size=8192, columns=list(TABLE_COLUMNS)):
                    table = pa.Table.from_batches([batch]).cast(TABLE_SCHEMA)
                    ids = table.column("row_id").to_numpy()
                    if len(ids) and (ids[0] != rows or not np.array_equal(ids, np.arange(rows, rows + len(ids)))):
                        raise RagindexError(f"{shard}: row_id not contiguous at row {rows} (got {ids[0]})")
                    for b in table.to_batches():
                        writer.write_batch(b)
                    rows += len(ids)
    return rows


# -- a whole version (`ragindex build`) ------------------------------------------------------------


def copy_tree(src_url: str, dst_fs: Any, dst_dir: str, s3_endpoint_url: str | None = None,
              progress: bool = True) -> None:
    """Copy the files of a directory into the store (each whole or not at all)."""
    from storage.fs import atomic_write
    from storage.names import check_file_name

    src_fs, src_dir = resolve(src_url, s3_endpoint_url)
    try:
        files = sorted(p.rstrip("/") for p in src_fs.ls(src_dir, detail=False))
    except FileNotFoundError:
        raise RagindexError(f"no directory at {src_url}") from None
    files = [p for p in files if src_fs.isfile(p)]
    for p in tqdm(files, desc=f"copying {os.path.basename(src_dir)}", unit="file", disable=None if progress else True):
        name = check_file_name(p.rsplit("/", 1)[-1])
        with src_fs.open(p, "rb") as src, atomic_write(dst_fs, join(dst_dir, name)) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


def build_version(store, passages_url: str, embeddings_url: str, *, spec: str = "auto",
                  memory_budget: int = 16 * 2**30, floors=None, canaries: str | None = None,
                  question_encoder: str | None = None, progress: bool = True, target_recall: float = 0.95):
    """`ragindex build`: stage a version from passage + embedding dirs, build, validate, commit.

    Never promotes. A failure before the commit removes the staging area (a kill leaves it to gc).
    """
    from storage.manifest import SourceDump
    from tasks.validate import ValidationFloors, draft_manifest, finalize_version

    src_fs, src_dir = resolve(passages_url, store.s3_endpoint_url)
    passages_summary = _read_json(src_fs, join(src_dir, PASSAGES_SUMMARY))
    try:
        source = SourceDump.model_validate(passages_summary["source"])
    except (KeyError, ValueError) as exc:
        raise RagindexError(f"{passages_url}/{PASSAGES_SUMMARY}: bad 'source' record ({exc})") from None
    open_embeddings(embeddings_url, store.s3_endpoint_url)  # fail on bad input before staging anything
    version_id = store.begin_version(source.wiki, source.dump_date)
    committed = False
    try:
        with store.build_lock(owner=f"ragindex build {version_id}"):
            timings: dict[str, float] = {}
            t = time.perf_counter()
            for sub, url in (("passages", passages_url), ("embeddings", embeddings_url)):
                if url.rstrip("/") != store.version_url(version_id, sub):
                    copy_tree(url, store.fs, store.version_path(version_id, sub), store.s3_endpoint_url, progress)
            timings["copy_s"] = time.perf_counter() - t
            t = time.perf_counter()
            vurl = store.version_url
            info = build_index(vurl(version_id, "embeddings"), vurl(version_id, "index.faiss"), spec=spec,
                               memory_budget=memory_budget, target_recall=target_recall,
                               s3_endpoint_url=store.s3_endpoint_url, progress=progress)
            timings["index_s"] = time.perf_counter() - t
            t = time.perf_counter()
            write_passage_table(vurl(version_id, "passages"), vurl(version_id, "passages.arrow"),
                                store.s3_endpoint_url)
            timings["table_s"] = time.perf_counter() - t
            fs = store.fs
            embeddings_summary = _read_json(fs, store.version_path(version_id, "embeddings", EMBEDDINGS_SUMMARY))
            parent = store.latest_ready()
            manifest = draft_manifest(store, version_id, passages_summary=passages_summary,
                                      embeddings_summary=embeddings_summary, index=info, timings=timings,
                                      parent=parent.version if parent else None)
            manifest = finalize_version(store, manifest, floors or ValidationFloors(), canaries=canaries,
                                        question_encoder=_load_question_encoder(question_encoder, manifest))
            committed = True
            return manifest
    finally:
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm(store.version_path(version_id), recursive=True)


def _load_question_encoder(model: str | None, manifest):
    if not model:
        return None
    from rag_model.encoders import load_question_encoder

    enc = manifest.encoder
    return load_question_encoder(model, enc.kind, normalize=enc.normalize, max_length=enc.max_length)
