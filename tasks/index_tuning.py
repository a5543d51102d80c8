"""Tuning a built index: the cheapest nprobe / efSearch that reaches a target recall@10 against exact search."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from rag_model.vector_search import search
from rag_model.vectors import TUNE_K, recall_at_k
from storage.manifest import IndexInfo

HNSW_EF_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048)


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
