"""Build a version's FAISS index from the embedding shards in the store, and assemble a whole version.

Embedding shards are read one at a time (memory-mapped locally), vectors are added shard by shard
with faiss ids == global row_id, and trained indexes learn from a random sample. The specs
(grammar in tasks.index_spec):

- `flat`: exact inner product (IndexFlatIP).
- `hnsw[:M=32,efConstruction=100]`: DPR's trick -- one extra dimension sqrt(phi - ||d||^2) with phi the
  max squared norm, L2 HNSW, queries get a 0 (see rag_model.vector_search); efSearch tuned.
- `ivfpq[:nlist=..,m=..,nbits=8,opq=0]`, `ivfsq[:nlist=..,bits=8]`: trained on a sample, nprobe tuned.
- any faiss factory string (inner-product metric), tuned when it has an nprobe or efSearch.
- `auto`: like autofaiss -- exact Flat for small sets, otherwise the smallest IVF code (SQ4 < SQ6 <
  SQ8 < SQfp16 < Flat) that fits the memory budget and reaches the target recall, nprobe tuned on
  held-out queries against exact search.

Train once, add many: with a `trained` location (tasks.assemble_version passes the store's `trained/`), a
trained empty index of the same encoder fingerprint and factory (tasks.trained_store) is reused
instead of training; the build falls back to training, and replaces the stored one, when the reused
index misses the target recall. `quantizer_reused`, `train_s` and `add_s` are in the index params.

A whole version (index, passage table, hash table, manifest, validation, commit) is assembled by
tasks.assemble_version, which calls build_index.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import faiss
import numpy as np

from rag_model.vector_search import apply_search_params, augment_vectors, coarse_search_width, hnsw_coarse_quantizer
from rag_model.vectors import GT_K, TUNE_K, EmbeddingShards, exact_search, open_embeddings, recall_at_k, sample_rows
from storage.errors import RagindexError, Rejected
from storage.fs import staged_local_file
from storage.location import Location
from storage.manifest import IndexInfo
from storage.timing import timed
from tasks.index_spec import DEFAULT_MEMORY_BUDGET, Plan, default_nlist, ivf_prefix, plan_index, refuse_if_over
from tasks.index_tuning import tune
from tasks.trained_store import TrainedRecord, entry_name, load_trained, save_trained

log = logging.getLogger(__name__)

AUTO_FLAT_MAX = 20_000  # below this brute force is both exact and fast enough
AUTO_CODES = ("SQ4", "SQ6", "SQ8", "SQfp16", "Flat")  # increasing size and fidelity
# auto's preselection ranks each query's exact neighbours this deep: the competitors that a lossy code
# lets past rank 10 come from ranks 11..200, at the density they have in the whole corpus.
PRESELECT_K = 200


# -- building --------------------------------------------------------------------------------------


def _new_index(plan: Plan) -> faiss.Index:
    if plan.metric == "l2":
        index = faiss.IndexHNSWFlat(plan.dim, plan.params["M"], faiss.METRIC_L2)
        index.hnsw.efConstruction = plan.params["efConstruction"]
        return index
    return faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)


def _train_size(nlist: int, n: int) -> int:
    return int(min(n, max(50 * nlist, 20_000), 262_144))


def add_vectors(index: faiss.Index, shards: EmbeddingShards, phi: float | None, progress: bool) -> None:
    with_ids = "IDMap" in type(index).__name__
    for start, block in shards.blocks(progress, desc="adding vectors"):
        if phi is not None:
            block = augment_vectors(block, phi)
        if with_ids:
            index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
        else:
            if index.ntotal != start:
                raise RagindexError(f"faiss ids out of step with row ids at row {start}")
            index.add(block)


def _max_sq_norm(shards: EmbeddingShards, progress: bool) -> float:
    phi = 0.0
    for _, block in shards.blocks(progress, desc="max norm"):
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


class Built(NamedTuple):
    index: faiss.Index
    info: IndexInfo
    timings: dict[str, float]
    trained: bytes | None  # the serialized trained, still empty index when this build trained one


def _build_plan(plan: Plan, shards: EmbeddingShards, budget: int, target_recall: float,
                queries: np.ndarray, gt: tuple[np.ndarray, np.ndarray], progress: bool,
                quantizer: faiss.Index | None = None,
                pretrained: tuple[faiss.Index, TrainedRecord] | None = None) -> Built:
    n, dim = shards.total, shards.dim
    timings: dict[str, float] = {}
    if plan.in_memory_bytes is not None:
        refuse_if_over(plan.spec, plan.in_memory_bytes, budget, n, dim)
    phi = _max_sq_norm(shards, progress) if plan.metric == "l2" else None
    index = pretrained[0] if pretrained is not None else _new_index(plan)
    params = dict(plan.params)
    trained = None
    if pretrained is not None:
        record = pretrained[1]
        timings["train_s"] = 0.0
        params.update({"train_size": record.train_size, "quantizer_reused": True,
                       "trained_sha256": record.sha256, "recall_at_training": record.recall_at_training})
        if plan.in_memory_bytes is None:
            few = shards.gather(sample_rows(n, 2000, seed=1))
            refuse_if_over(plan.spec, _measured_bytes(index, few, n), budget, n, dim)
    elif not index.is_trained:
        with timed(timings, "train_s"):
            sample = shards.gather(sample_rows(n, _train_size(plan.params.get("nlist", 1), n), seed=1))
            params["train_size"] = len(sample)
            if quantizer is not None:
                _reuse_quantizer(index, quantizer)
            index.train(sample)
        params["quantizer_reused"] = False
        trained = faiss.serialize_index(index).tobytes()  # still empty: what later builds can start from
        if plan.in_memory_bytes is None:
            refuse_if_over(plan.spec, _measured_bytes(index, sample, n), budget, n, dim)
        del sample
    coarse = hnsw_coarse_quantizer(index)
    if coarse is not None:
        coarse.hnsw.efSearch = coarse_search_width(1)  # each vector goes to its nearest list
    with timed(timings, "add_s"):
        add_vectors(index, shards, phi, progress)
    info = IndexInfo(spec=plan.spec, factory=plan.factory, metric=plan.metric, dim=plan.dim, params=params,
                     phi=phi)
    with timed(timings, "tune_s"):
        search_params, recall = tune(index, info, queries, gt[0], gt[1], target_recall)
    info.search_params = search_params
    info.params.update({"tuned_recall_at_10": round(recall, 4), "target_recall": target_recall,
                        "tuning_queries": len(queries)})
    return Built(index, info, timings, trained)


def _reuse_quantizer(index: faiss.Index, quantizer: faiss.Index) -> None:
    """Give an IVF index an already trained coarse quantizer, so auto trains k-means once."""
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    ivf.quantizer.is_trained = True


def _build_auto(shards: EmbeddingShards, budget: int, target_recall: float, queries: np.ndarray,
                gt: tuple[np.ndarray, np.ndarray], neighbours: np.ndarray, progress: bool,
                trained: Location | None = None) -> Built:
    """`neighbours`: each query's PRESELECT_K exact neighbours (ids), deeper than `gt`, for preselection."""
    n, dim = shards.total, shards.dim
    if n <= AUTO_FLAT_MAX and n * dim * 4 <= budget:
        plan = Plan("auto", "Flat", "ip", dim, {"chosen": "flat: small enough for exact search"},
                    in_memory_bytes=n * dim * 4)
        return _build_plan(plan, shards, budget, target_recall, queries, gt, progress)
    reused_recall = None
    if trained is not None:
        reused, reused_recall = _auto_from_trained(shards, budget, target_recall, queries, gt, progress, trained)
        if reused is not None:
            return reused
    nlist = default_nlist(n)
    code_bytes = {"SQ4": dim / 2, "SQ6": dim * 3 / 4, "SQ8": dim, "SQfp16": 2 * dim, "Flat": 4 * dim}
    fits = [c for c in AUTO_CODES if n * (code_bytes[c] + 8) + nlist * dim * 4 <= budget]
    if not fits:
        refuse_if_over("auto (smallest code SQ4)", int(n * (code_bytes["SQ4"] + 8)), budget, n, dim)
    # Train the coarse quantizer once; every candidate shares it.
    coarse_timing: dict[str, float] = {}
    with timed(coarse_timing, "train_s"):
        sample = shards.gather(sample_rows(n, _train_size(nlist, n), seed=1))
        coarse = faiss.IndexFlatIP(dim)
        km = faiss.Clustering(dim, nlist)
        km.niter, km.max_points_per_centroid, km.seed = 10, 256, 1
        km.train(sample, coarse)
    train_s = coarse_timing["train_s"]
    # Preselect by quantization loss at exhaustive probing, smallest code first, with margin. The candidates
    # are each query's exact neighbours in the whole corpus (plus a random background): a random subset
    # would hold the neighbours at a fraction of their real density and overrate small codes at scale.
    candidate_ids = np.union1d(neighbours[neighbours >= 0], sample_rows(n, min(n, 20_000), seed=2))
    candidates = shards.gather(candidate_ids)
    tried: list[dict[str, Any]] = []
    margin = min(0.02, (1 - target_recall) / 2)
    start_at = len(fits) - 1
    for pos, code in enumerate(fits):
        probe = faiss.index_factory(dim, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
        _reuse_quantizer(probe, coarse)
        probe.train(sample[:20_000])
        probe.add_with_ids(candidates, candidate_ids)
        faiss.extract_index_ivf(probe).nprobe = nlist
        _, found = probe.search(queries, TUNE_K)
        r = recall_at_k(found, gt[1], gt[0])
        tried.append({"code": code, "neighbour_recall_exhaustive": round(r, 4)})
        if r >= target_recall + margin or code == "Flat":
            start_at = pos
            break
    del candidates
    for code in fits[start_at:]:
        plan = Plan("auto", f"{ivf_prefix(nlist)},{code}", "ip", dim,
                    {"nlist": nlist, "code": code, "preselection": tried, "coarse_train_s": round(train_s, 2)})
        built = _build_plan(plan, shards, budget, target_recall, queries, gt, progress, quantizer=coarse)
        info = built.info
        if info.params["tuned_recall_at_10"] >= target_recall or code == fits[-1]:
            built.timings["train_s"] = built.timings.get("train_s", 0.0) + train_s
            if reused_recall is not None:
                info.params["retrained_after_reused_recall"] = round(reused_recall, 4)
            if trained is not None and built.trained is not None:
                save_trained(trained, shards.fingerprint.key, _auto_entry(n), plan.factory, built.trained, dim,
                             info.params.get("train_size", 0), info.params["tuned_recall_at_10"])
            return built
        tried.append({"code": code, "full_recall_max_nprobe": info.params["tuned_recall_at_10"]})
        log.info("auto: %s reaches only %.3f recall; trying a larger code", code, info.params["tuned_recall_at_10"])
    raise AssertionError("unreachable")


def _auto_entry(n: int) -> str:
    """auto's trained entry: one per coarse-quantizer size, which depends on n only through default_nlist."""
    return f"auto-IVF{default_nlist(n)}"


def _auto_from_trained(shards: EmbeddingShards, budget: int, target_recall: float, queries: np.ndarray,
                       gt: tuple[np.ndarray, np.ndarray], progress: bool,
                       trained: Location) -> tuple[Built | None, float | None]:
    """auto from the index trained by an earlier build of this fingerprint, if it still reaches the
    target; else (None, the recall it reached, or None when there was none to reuse)."""
    n, dim = shards.total, shards.dim
    loaded = load_trained(trained, shards.fingerprint.key, _auto_entry(n), dim)
    if loaded is None:
        return None, None
    factory = loaded[1].factory
    plan = Plan("auto", factory, "ip", dim, {"nlist": default_nlist(n), "code": factory.split(",")[-1],
                                              "chosen": "the code trained by an earlier build of this encoder"})
    built = _build_plan(plan, shards, budget, target_recall, queries, gt, progress, pretrained=loaded)
    recall = built.info.params["tuned_recall_at_10"]
    if recall >= target_recall:
        return built, None
    log.info("auto: the stored %s reaches only %.3f recall here; training again", factory, recall)
    return None, recall


def _plan_with_trained(plan: Plan, shards: EmbeddingShards, budget: int, target_recall: float,
                       queries: np.ndarray, gt: tuple[np.ndarray, np.ndarray], progress: bool,
                       trained: Location | None) -> Built:
    """An explicit spec's build, starting from the stored trained index when there is one that still
    reaches the target recall; a build that trains stores what it trained."""
    key, entry = shards.fingerprint.key, entry_name(plan.factory)
    reused_recall = None
    if trained is not None and plan.metric == "ip" and not _new_index(plan).is_trained:
        loaded = load_trained(trained, key, entry, plan.dim)
        if loaded is not None:
            built = _build_plan(plan, shards, budget, target_recall, queries, gt, progress, pretrained=loaded)
            reused_recall = built.info.params["tuned_recall_at_10"]
            if reused_recall >= target_recall:
                return built
            log.info("%s: the stored trained index reaches only %.3f recall here; training again", plan.factory,
                     reused_recall)
            del built
    built = _build_plan(plan, shards, budget, target_recall, queries, gt, progress)
    if reused_recall is not None:
        built.info.params["retrained_after_reused_recall"] = reused_recall
    if trained is not None and built.trained is not None:
        save_trained(trained, key, entry, plan.factory, built.trained, plan.dim,
                     built.info.params.get("train_size", 0), built.info.params["tuned_recall_at_10"])
    return built


def build_index(
    embeddings: Location,
    index_file: Location,
    *,
    spec: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    target_recall: float = 0.95,
    progress: bool = True,
    trained: Location | None = None,
) -> IndexInfo:
    """Build the index for the embedding shards at `embeddings` and write it to `index_file`.

    With `trained` (a store's `trained/` directory) a trained index of the same encoder
    fingerprint and factory is reused instead of training, and what a build trains is kept there.
    """
    if not 0 < target_recall <= 1:
        raise Rejected(f"target recall must be in (0, 1], got {target_recall}")
    overall: dict[str, float] = {}
    with timed(overall, "build_s"):
        shards = open_embeddings(embeddings)
        n, dim = shards.total, shards.dim
        plan = plan_index(spec, n, dim)
        if plan is not None and plan.in_memory_bytes is not None:
            refuse_if_over(spec, plan.in_memory_bytes, memory_budget, n, dim)  # before reading any vector
        queries = shards.gather(sample_rows(shards.total, 500 if n <= 1_000_000 else 200, seed=3))
        with timed(overall, "ground_truth_s"):
            deep_s, deep_i = exact_search(shards, queries, PRESELECT_K if plan is None else GT_K, progress)
            gt = (np.ascontiguousarray(deep_s[:, :GT_K]), np.ascontiguousarray(deep_i[:, :GT_K]))
        if plan is None:
            index, info, timings, _ = _build_auto(shards, memory_budget, target_recall, queries, gt, deep_i,
                                                  progress, trained)
        else:
            index, info, timings, _ = _plan_with_trained(plan, shards, memory_budget, target_recall, queries, gt,
                                                         progress, trained)
        apply_search_params(index, info)
        info.bytes = write_faiss_index(index, index_file)
    info.params.update({k: round(v, 3) for k, v in timings.items()})
    info.params.update({**overall, "ntotal": int(index.ntotal), "bytes_per_vector": round(info.bytes / max(1, n), 2)})
    log.info("built %s (%s) over %d vectors: %s", spec, info.factory, n, info.search_params)
    return info


def write_faiss_index(index: faiss.Index, where: Location) -> int:
    """Write an index whole or not at all (local temp + rename, or upload of a finished file)."""
    with staged_local_file(where.fs, where.path) as tmp:
        faiss.write_index(index, tmp)
        size = os.path.getsize(tmp)
    return size
