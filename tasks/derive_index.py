"""A delta version's index over its own new rows, derived from its lineage's base index, never retrained.

IVF: the base's trained coarse quantizer and codebooks (SQ/PQ) are kept, its inverted lists are
replaced by empty ones, and the new vectors are added. The base's file is only read (memory-mapped),
never rewritten: the rows a delta drops stay in it and are excluded at search time by the delta's
tombstones (`rag_model.segments`). nprobe / efSearch are the base's: the same quantizer, the same
search width. Flat and HNSW bases have nothing trained to keep: the delta's rows get their own exact
index, or their own small graph built with the base's spec (an HNSW graph cannot remove a node, so
dropped rows of the base's graph are excluded the same way, after the search).
"""

from __future__ import annotations

import time

import faiss

from rag_model.vector_search import read_index
from rag_model.vectors import open_embeddings
from storage import layout
from storage.location import Location
from storage.manifest import IndexInfo, Manifest
from storage.verify import expected_sha256
from tasks.build_index import add_vectors, build_index, write_faiss_index
from tasks.index_spec import DEFAULT_MEMORY_BUDGET


def derive_index(store, base: Manifest, embeddings: Location, index_file: Location, *, progress: bool = True,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> IndexInfo:
    """Build `index_file` over the vectors at `embeddings` the way `base` (a full version) indexes its rows."""
    info = base.index
    if "IVF" not in info.factory:
        spec = info.spec if info.spec != "auto" else "flat"  # auto without IVF is exact Flat
        built = build_index(embeddings, index_file, spec=spec, memory_budget=memory_budget, progress=progress)
        built.params["derived_from"] = base.version
        return built
    started = time.perf_counter()
    relpath = layout.INDEX_FILE
    index = read_index(store.at(base.version, relpath), sha256=expected_sha256(base, relpath),
                       cache=store.file_cache())
    ivf = faiss.extract_index_ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    empty.this.disown()  # the index owns it now: Python must not free it too
    ivf.ntotal = index.ntotal = 0
    shards = open_embeddings(embeddings)
    add_vectors(index, shards, None, progress)
    size = write_faiss_index(index, index_file)
    params = {**info.params, "derived_from": base.version, "quantizer_reused": True, "train_s": 0.0,
              "add_s": round(time.perf_counter() - started, 3), "ntotal": int(index.ntotal)}
    return info.model_copy(update={"params": params, "bytes": size})
