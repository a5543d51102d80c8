"""Answering a question from the store directly, without a server (`ragindex query`, the demo)."""

from __future__ import annotations

from dataclasses import dataclass

from rag_model.index import Hit
from rag_model.retriever import HotSwapRetriever, paired_question_encoder_factory
from storage.errors import Corrupt, NotFound, RagindexError
from storage.store import IndexStore


@dataclass
class QueryAnswer:
    version: str
    query: str
    hits: list[Hit]

    def to_dict(self) -> dict:
        return {"version": self.version, "query": self.query, "hits": [h.to_dict() for h in self.hits]}


def query_store(
    store: IndexStore,
    text: str,
    k: int = 5,
    version: str | None = None,
    question_encoder: str | None = None,
    question_encoder_kind: str | None = None,
    cache_dir: str | None = None,
    cache_max_bytes: int | None = None,
) -> QueryAnswer:
    """Top-k passages for `text` from `version` (default CURRENT), with provenance.

    The version is opened like a server opens it: every file it maps is verified against its manifest
    (through the local cache, so an unchanged file is hashed once); `Corrupt` names the file that is not."""
    if question_encoder_kind not in (None, "dpr", "mean"):
        raise RagindexError(f"question encoder kind must be dpr or mean, not {question_encoder_kind!r}")
    if not text.strip():
        raise RagindexError("empty question")
    if not 1 <= k <= 100:
        raise RagindexError(f"k must be between 1 and 100, got {k}")
    if version is None:
        pointer = store.current()
        if pointer is None:
            raise NotFound(f"no CURRENT version in {store.url}: promote one, or pass --version")
        version = pointer.version
    retriever = HotSwapRetriever(
        question_encoder_factory=paired_question_encoder_factory(question_encoder, question_encoder_kind),
        warmup_rounds=0,
        cache_dir=cache_dir,
        cache_max_bytes=cache_max_bytes,
    )
    swap = retriever.swap_to(store, version)
    if not swap.ok:
        if swap.error_kind == "Corrupt":
            raise Corrupt(swap.error or f"version {version} does not match its manifest")
        raise RagindexError(swap.error or f"cannot open version {version}")
    result = retriever.retrieve_with_provenance([text], k)
    return QueryAnswer(result.version, text, result.hits[0])
