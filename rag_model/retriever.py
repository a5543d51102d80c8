"""A `RagRetriever` whose index is one reference, replaced atomically when a new version is promoted.

Why requests are never mixed: every call reads `self._current` exactly once and answers the whole
batch from that object (a `VersionIndex` is immutable), and the answer names that object's
version. A swap only rebinds the reference; in-flight calls keep their own reference, so the old
version is released (CPython refcounting, no cycles) the moment the last of them returns.

transformers' `RagModel` calls the retriever more than once per `generate` (RAG-Sequence retrieves
again to score each candidate), so `pinned()` fixes one version for the current thread for the
duration of a generate call: every retrieval inside it uses the same version.

`RagRetriever.__init__` insists on the `datasets` package for its built-in indexes; this class
brings its own index, so it sets the same attributes itself instead of calling it. In
retrieval-only mode (no generator) its `config` is a `RagConfig` built from the question
encoder's config and transformers' default generator config: only the retrieval fields
(`n_docs`, `retrieval_batch_size`, `retrieval_vector_size`) are meaningful there, and `__call__`
(which formats generator inputs) refuses to run without a generator tokenizer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from transformers import RagConfig, RagRetriever

from rag_model.index import Hit, VersionIndex
from storage.cache import FileCache
from storage.errors import RagindexError, Rejected, first_line
from storage.manifest import Manifest
from storage.store import IndexStore

log = logging.getLogger(__name__)
# Swaps, refusals and rollbacks: one record each, its `extra` an `event` name and its `fields`
# (versions `from` / `to`, timings in seconds), for the edge to format (`ragindex serve`: logfmt).
events = logging.getLogger("ragindex.serving")


class NotReady(RagindexError):
    """No index version is loaded yet."""


class QuestionEncoderLike(Protocol):
    dim: int
    tokenizer: Any

    def encode(self, questions: list[str]) -> np.ndarray: ...


@dataclass
class SwapResult:
    ok: bool
    version: str
    previous: str | None
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    seconds: float = 0.0
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    error: str | None = None
    error_kind: str | None = None  # the exception's class name: "Corrupt" for a verification refusal
    changed: bool = True  # False when the version was already serving

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrievalResult:
    version: str
    hits: list[list[Hit]]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "hits": [[h.to_dict() for h in row] for row in self.hits]}


@dataclass
class DocRecord:
    """What the last retrieval on this thread used: read by the model to report provenance."""

    version: str
    doc_ids: np.ndarray
    doc_scores: np.ndarray


class HotSwapRetriever(RagRetriever):
    def __init__(
        self,
        question_encoder: QuestionEncoderLike | None = None,
        *,
        config: RagConfig | None = None,
        generator_tokenizer: Any = None,
        question_encoder_factory: Callable[[Manifest], QuestionEncoderLike] | None = None,
        expected_fingerprint_key: str | None = None,
        cache_dir: str | None = None,
        cache_max_bytes: int | None = None,
        with_embeddings: bool = False,
        warmup_rounds: int = 3,
    ) -> None:
        # Deliberately not calling RagRetriever.__init__: it requires `datasets` and builds its own index.
        self._init_retrieval = False
        self._current: VersionIndex | None = None
        self._swap_lock = threading.RLock()  # re-entered by `reopen`
        self._config_lock = threading.Lock()
        self._local = threading.local()
        self.question_encoder = question_encoder
        self.question_encoder_factory = question_encoder_factory
        self.generator_tokenizer = generator_tokenizer
        self.expected_fingerprint_key = expected_fingerprint_key
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self._caches: dict[str, FileCache] = {}
        self.with_embeddings = with_embeddings
        self.warmup_rounds = warmup_rounds
        self.ctx_encoder_tokenizer = None
        self.return_tokenized_docs = False
        self.last_swap: SwapResult | None = None
        self.last_failure: SwapResult | None = None
        self.swap_listeners: list[Callable[[SwapResult], None]] = []
        self.config = config
        if config is None and question_encoder is not None:
            self.config = self._retrieval_only_config(question_encoder)

    # -- the one reference ---------------------------------------------------------------------

    @property
    def index(self) -> VersionIndex:  # what RagRetriever's own methods read
        pinned = getattr(self._local, "pinned", None)
        if pinned is not None:
            return pinned
        current = self._current
        if current is None:
            raise NotReady("no index version is loaded yet")
        return current

    @property
    def version(self) -> str | None:
        current = self._current
        return current.version if current else None

    @property
    def current(self) -> VersionIndex | None:
        return self._current

    @property
    def question_encoder_tokenizer(self) -> Any:
        return self.question_encoder.tokenizer if self.question_encoder is not None else None

    @question_encoder_tokenizer.setter
    def question_encoder_tokenizer(self, value: Any) -> None:  # RagRetriever API; the encoder owns it here
        pass

    @property
    def n_docs(self) -> int:
        return self.config.n_docs if self.config is not None else 5

    @property
    def batch_size(self) -> int:
        return self.config.retrieval_batch_size if self.config is not None else 8

    @contextmanager
    def pinned(self) -> Iterator[VersionIndex]:
        """Every retrieval on this thread inside the block uses the same version."""
        index = self.index
        previous = getattr(self._local, "pinned", None)
        self._local.pinned = index
        try:
            yield index
        finally:
            self._local.pinned = previous

    # -- swapping ------------------------------------------------------------------------------

    def swap_to(self, store: IndexStore, version_id: str, force: bool = False, rehash: bool = False) -> SwapResult:
        """Load `version_id` off the request path, check it, warm it up, then replace the reference.

        `force` re-opens the version already serving; `rehash` hashes every file again instead of trusting
        the records of unchanged ones (a reload). On any failure the serving version stays as it was and
        the failure is recorded and returned.
        """
        with self._swap_lock:
            previous = self.version
            if version_id == previous and not force:
                return SwapResult(ok=True, version=version_id, previous=previous, changed=False)
            start = time.perf_counter()
            try:
                loaded = VersionIndex.open(store, version_id, with_embeddings=self.with_embeddings,
                                           cache=self.cache_for(store), rehash=rehash)
                load_s = time.perf_counter() - start
                self._check_compatible(loaded)
                warm_s = loaded.warm_up(self.warmup_rounds) if self.warmup_rounds else 0.0
            except Exception as exc:  # any failure keeps the old version serving; it is reported, not raised
                result = SwapResult(
                    ok=False, version=version_id, previous=previous, seconds=time.perf_counter() - start,
                    error=_swap_error(exc), error_kind=type(exc).__name__,
                )
                self.last_failure = result
                events.error("swap to %s refused, still serving %s: %s", version_id, previous, result.error,
                             extra={"event": "swap_refused", "fields": {
                                 "from": previous, "to": version_id, "error_kind": result.error_kind,
                                 "error": result.error, "total_s": result.seconds}})
                self._notify(result)
                return result
            if self.expected_fingerprint_key is None:
                self.expected_fingerprint_key = loaded.manifest.encoder.key
            self._current = loaded  # the swap: one reference rebinding; the old object lives while in use
            del loaded
            result = SwapResult(
                ok=True, version=version_id, previous=previous, seconds=time.perf_counter() - start,
                load_seconds=load_s, warmup_seconds=warm_s,
            )
            self.last_swap = result
            events.info("now serving %s (was %s), swap took %.2fs", version_id, previous, result.seconds,
                        extra={"event": "swap", "fields": {
                            "from": previous, "to": version_id, "load_s": load_s, "warm_up_s": warm_s,
                            "total_s": result.seconds}})
            self._notify(result)
            return result

    def reopen(self, store: IndexStore, version_id: str) -> SwapResult | None:
        """Open `version_id` again, every file hashed again, if it is still the version serving (None if
        another version swapped in meanwhile: a late check of an old version must not swap it back)."""
        with self._swap_lock:
            if self.version != version_id:
                return None
            return self.swap_to(store, version_id, force=True, rehash=True)

    def deny_pages(self, page_ids: frozenset[int]) -> bool:
        """Serve the current version without the rows of `page_ids` (the store's deny-list, read at each
        poll), in one reference rebinding like a swap; True when that changed what is served."""
        with self._swap_lock:
            current = self._current
            if current is None or current.denied == page_ids:
                return False
            self._current = current.without_pages(page_ids)
            events.warning("serving %s without %d page(s) taken down", current.version, len(page_ids), extra={
                "event": "denied_pages", "fields": {"version": current.version, "pages": sorted(page_ids)[:20],
                                                    "count": len(page_ids)}})
            return True

    def cache_for(self, store: IndexStore) -> FileCache:
        """The one local file cache of `store` (per store and user), shared by every version opened from it."""
        with self._config_lock:
            if store.url not in self._caches:
                self._caches[store.url] = FileCache.for_store(store.url, base=self.cache_dir,
                                                              max_bytes=self.cache_max_bytes)
            return self._caches[store.url]

    def _check_compatible(self, loaded: VersionIndex) -> None:
        fingerprint = loaded.manifest.encoder
        if self.expected_fingerprint_key is not None and fingerprint.key != self.expected_fingerprint_key:
            raise Rejected(
                f"version {loaded.version} was embedded by encoder {fingerprint.model_id} "
                f"(fingerprint {fingerprint.key}), but the serving question encoder pairs with fingerprint "
                f"{self.expected_fingerprint_key}"
            )
        if self.question_encoder is None:
            if self.question_encoder_factory is None:
                raise RagindexError("no question encoder configured and no way to load the paired one")
            encoder = self.question_encoder_factory(loaded.manifest)
            _check_dim(encoder.dim, loaded)
            with self._config_lock:
                self.question_encoder = encoder
                if self.config is None:
                    self.config = self._retrieval_only_config(encoder)
        _check_dim(self.question_encoder.dim, loaded)

    def _notify(self, result: SwapResult) -> None:
        for listener in self.swap_listeners:
            try:
                listener(result)
            except Exception:  # a broken listener must not break swapping
                log.exception("swap listener failed")

    @staticmethod
    def _retrieval_only_config(encoder: QuestionEncoderLike) -> RagConfig:
        model = getattr(encoder, "model", None)
        qconfig = model.config.to_dict() if model is not None and hasattr(model, "config") else None
        return RagConfig(question_encoder=qconfig, retrieval_vector_size=encoder.dim, index_name="ragindex")

    # -- retrieving ----------------------------------------------------------------------------

    def encode(self, questions: list[str]) -> np.ndarray:
        if self.question_encoder is None:
            raise NotReady("no question encoder is loaded yet (it is chosen with the first index version)")
        return self.question_encoder.encode(list(questions))

    def retrieve_with_provenance(self, questions: list[str], k: int) -> RetrievalResult:
        index = self.index  # taken once: the whole batch comes from this version
        return RetrievalResult(index.version, index.search(self.encode(questions), k))

    def retrieve(self, question_hidden_states: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """RagRetriever.retrieve, reading the index reference once (the base class reads it twice)."""
        index = self.index
        states = np.asarray(question_hidden_states, dtype=np.float32)
        doc_ids, doc_embeds = index.get_top_docs(states, n_docs)
        docs = index.get_doc_dicts(doc_ids)
        scores = np.einsum("bd,bkd->bk", states, doc_embeds)
        records = getattr(self._local, "records", None)
        if records is not None:
            records.append(DocRecord(index.version, doc_ids, scores))
        return doc_embeds, doc_ids, docs

    def reset_records(self) -> None:
        """Start recording this thread's retrievals (provenance of one generate call)."""
        self._local.records = []

    def first_record(self) -> DocRecord | None:
        """The first retrieval since `reset_records`: the documents generate conditioned on. (RAG-Sequence
        retrieves again to score candidates, with config.n_docs; the first call used the asked n_docs.)"""
        records = getattr(self._local, "records", None) or []
        self._local.records = None
        return records[0] if records else None

    def __call__(self, question_input_ids, question_hidden_states, prefix=None, n_docs=None, return_tensors=None):
        if self.generator_tokenizer is None or self.config is None:
            raise RagindexError("this retriever serves retrieval only: no generator tokenizer to format RAG inputs")
        return super().__call__(question_input_ids, question_hidden_states, prefix, n_docs, return_tensors)

    def init_retrieval(self) -> None:
        """Versions are opened by `swap_to`; nothing to initialise."""

    def save_pretrained(self, save_directory: str) -> None:
        raise RagindexError("a hot-swap retriever is not saved: its index lives in the version store")


def _check_dim(dim: int, loaded: VersionIndex) -> None:
    if dim != loaded.manifest.encoder.dim:
        raise Rejected(
            f"version {loaded.version} has {loaded.manifest.encoder.dim}-dimensional vectors, "
            f"the serving question encoder produces {dim}"
        )


def _swap_error(exc: BaseException) -> str:
    """An expected failure as its message; anything else also names its type (it is a bug to report)."""
    return first_line(exc) if isinstance(exc, RagindexError) else f"{type(exc).__name__}: {first_line(exc)}"


def paired_question_encoder_factory(
    model: str | None = None, kind: str | None = None
) -> Callable[[Manifest], QuestionEncoderLike]:
    """A factory loading the question encoder for a version: `model` if given, else the one the
    manifest pairs with its document encoder (for a symmetric `mean` encoder, the same model)."""

    def factory(manifest: Manifest) -> QuestionEncoderLike:
        from rag_model.encoders import question_encoder_for

        return question_encoder_for(manifest.encoder, model or manifest.question_encoder, kind)

    return factory
