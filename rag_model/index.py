"""One loaded index version: its faiss index, its passages and its manifest, opened for serving.

Memory: the faiss index is read through `vector_search.read_index` with memory mapping, and the
passages through the memory-mapped `passages.arrow` (Arrow IPC file, uncompressed), so a row is
looked up by `row_id` without the table ever being copied into the heap. Only the pages that
searches and look-ups touch become resident, and they are file-backed: two versions side by side
during a swap do not double anonymous memory.

The class implements transformers' RAG `Index` interface (`get_doc_dicts`, `get_top_docs`,
`init_index`, `is_initialized`) so `RagRetriever` machinery and RAG models use it like their own
indexes. `get_top_docs` needs the document vectors (RAG scores documents with them); those come
from the version's own `embeddings/part-*.npy`, memory-mapped on first use.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from transformers.models.rag.retrieval_rag import Index

from rag_model.vectors import load_shard
from storage import layout
from storage.cache import FileCache, Lease
from storage.errors import RagindexError, Rejected
from storage.layout import INDEX_FILE, PASSAGE_TABLE, TABLE_COLUMNS
from storage.manifest import Manifest
from storage.records import EmbeddingsSummary
from storage.store import IndexStore
from storage.timing import timed
from storage.verify import expected_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One retrieved passage with everything needed to cite the exact Wikipedia revision."""

    row_id: int
    score: float
    passage_id: str
    page_id: int
    rev_id: int
    title: str
    text: str
    url: str
    version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wiki_language(wiki: str) -> str:
    """'enwiki' -> 'en', 'simplewiki' -> 'simple', 'zh_min_nanwiki' -> 'zh-min-nan'."""
    return wiki.removesuffix("wiki").replace("_", "-") or "en"


def revision_url(lang: str, page_id: int, rev_id: int) -> str:
    return f"https://{lang}.wikipedia.org/w/index.php?curid={page_id}&oldid={rev_id}"


class VersionIndex(Index):
    """A version opened read-only for searching. Immutable once opened; safe to share between threads."""

    def __init__(
        self,
        version: str,
        manifest: Manifest,
        faiss_index: Any,
        passages: pa.Table,
        embeddings: list[tuple[int, str]] | None = None,
    ) -> None:
        self.version = version
        self.manifest = manifest
        self.faiss_index = faiss_index
        self.passages = passages
        # Table.take concatenates every chunk of a column first (O(table) per call): look rows up per batch.
        self._batches = passages.to_batches()
        self._batch_starts = np.cumsum([0] + [b.num_rows for b in self._batches], dtype=np.int64)
        self.lang = wiki_language(manifest.source.wiki)
        self.dim = manifest.encoder.dim
        # (first row_id, local .npy path) per embedding shard, mapped lazily: retrieval alone never needs them
        self._embedding_files = embeddings
        self._embedding_shards: list[tuple[int, np.ndarray]] | None = None
        self._embedding_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: IndexStore,
        version_id: str,
        cache_dir: str | None = None,
        with_embeddings: bool = False,
        cache: FileCache | None = None,
    ) -> VersionIndex:
        """Open a ready version of `store`, every file it maps verified against the manifest first.

        Files reach local disk through the one cache (`storage.cache`): a remote store's are copied
        there (they must be local files to be memory-mapped), a local store's are mapped in place; each
        is hashed once and re-hashed only when it changed. `Corrupt` names the first file that does
        not match. `cache_dir` is the cache's base directory when no `cache` is given."""
        from rag_model import vector_search

        manifest = store.manifest(version_id)
        if manifest.status != "ready":
            raise Rejected(f"version {version_id} is {manifest.status}, not ready: refusing to serve it")
        lease = (cache or FileCache.for_store(store.url, base=cache_dir)).lease()
        try:
            faiss_index = vector_search.read_index(_local_file(lease, store, manifest, INDEX_FILE), mmap=True)
            passages = _map_passages(version_id, _local_file(lease, store, manifest, PASSAGE_TABLE))
            rows = manifest.counts.get("passages", passages.num_rows)
            if passages.num_rows != rows or faiss_index.ntotal != passages.num_rows:
                raise Rejected(
                    f"version {version_id} is inconsistent: {faiss_index.ntotal} vectors, "
                    f"{passages.num_rows} rows in {PASSAGE_TABLE}, manifest counts {rows}"
                )
            embeddings = _embedding_files(lease, store, manifest) if with_embeddings else None
        except BaseException:
            lease.release()
            raise
        opened = cls(version_id, manifest, faiss_index, passages, embeddings)
        # The files stay pinned in the cache for as long as anything (an in-flight request) holds this object.
        weakref.finalize(opened, lease.release)
        return opened

    # -- searching -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.passages.num_rows

    def search_ids(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner-product scores [n, k], row ids [n, k]); -1 marks a slot with no result."""
        from rag_model import vector_search

        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise Rejected(f"query vectors have shape {queries.shape}; version {self.version} needs [n, {self.dim}]")
        return vector_search.search(self.faiss_index, self.manifest.index, queries, k)

    def search(self, query_vectors: np.ndarray, k: int) -> list[list[Hit]]:
        scores, ids = self.search_ids(query_vectors, k)
        return [self.hits(row_scores, row_ids) for row_scores, row_ids in zip(scores, ids, strict=True)]

    def hits(self, scores: np.ndarray, row_ids: np.ndarray) -> list[Hit]:
        keep = [(float(s), int(r)) for s, r in zip(scores, row_ids, strict=True) if r >= 0]
        rows = self.rows([r for _, r in keep])
        return [
            Hit(
                row_id=row_id,
                score=score,
                passage_id=row["passage_id"],
                page_id=row["page_id"],
                rev_id=row["rev_id"],
                title=row["title"],
                text=row["text"],
                url=revision_url(self.lang, row["page_id"], row["rev_id"]),
                version=self.version,
            )
            for (score, row_id), row in zip(keep, rows, strict=True)
        ]

    def rows(self, row_ids: list[int]) -> list[dict[str, Any]]:
        """Passages by row_id, read from the mapped file (only the touched pages become resident)."""
        if not row_ids:
            return []
        positions = np.searchsorted(self._batch_starts, row_ids, side="right") - 1
        taken = []
        for row_id, batch in zip(row_ids, positions.tolist(), strict=True):
            if not 0 <= row_id < self.size:
                raise RagindexError(f"version {self.version}: no row {row_id} in {PASSAGE_TABLE}")
            offset = row_id - int(self._batch_starts[batch])
            taken.append(self._batches[batch].slice(offset, 1).to_pylist()[0])
        for want, row in zip(row_ids, taken, strict=True):
            if row["row_id"] != want:  # the contract says row i has row_id i; never serve a wrong passage
                raise RagindexError(f"version {self.version}: {PASSAGE_TABLE} row {want} has row_id {row['row_id']}")
        return taken

    def warm_up(self, rounds: int = 3, k: int = 5) -> float:
        """A few real searches and look-ups, so the first request after a swap does not pay for page faults."""
        timing: dict[str, float] = {}
        with timed(timing, "warm_up_s"):
            rng = np.random.default_rng(0)
            for _ in range(rounds):
                queries = rng.standard_normal((2, self.dim)).astype(np.float32)
                self.search(queries, min(k, self.size))
        return timing["warm_up_s"]

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        """Document vectors [.., dim] for row ids (from the version's embedding shards)."""
        shards = self._mapped_embeddings()
        flat = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        starts = np.array([s for s, _ in shards], dtype=np.int64)
        for i, row_id in enumerate(flat):
            if row_id < 0:
                continue
            shard = int(np.searchsorted(starts, row_id, side="right") - 1)
            first, array = shards[shard]
            out[i] = array[row_id - first]
        return out.reshape(*np.shape(row_ids), self.dim)

    def _mapped_embeddings(self) -> list[tuple[int, np.ndarray]]:
        with self._embedding_lock:
            if self._embedding_shards is None:
                if self._embedding_files is None:
                    raise RagindexError(f"version {self.version} was opened without its embeddings")
                local = LocalFileSystem()
                self._embedding_shards = [(first, load_shard(local, path)) for first, path in self._embedding_files]
            return self._embedding_shards

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "version": self.version,
            "wiki": m.source.wiki,
            "dump_date": m.source.dump_date,
            "created_at": m.created_at.isoformat(),
            "passages": self.size,
            "encoder": {"model_id": m.encoder.model_id, "kind": m.encoder.kind, "dim": m.encoder.dim,
                        "fingerprint_key": m.encoder.key},
            "question_encoder": m.question_encoder,
            "index": {"spec": m.index.spec, "factory": m.index.factory, "metric": m.index.metric,
                      "search_params": m.index.search_params},
        }

    # -- transformers' RAG Index interface -------------------------------------------------------

    def init_index(self) -> None:
        """Nothing to do: `open` already mapped everything."""

    def is_initialized(self) -> bool:
        return True

    def get_top_docs(self, question_hidden_states: np.ndarray, n_docs: int = 5) -> tuple[np.ndarray, np.ndarray]:
        _, ids = self.search_ids(question_hidden_states, n_docs)
        if (ids < 0).any():
            raise RagindexError(
                f"version {self.version} returned fewer than n_docs={n_docs} documents; ask for fewer documents"
            )
        return ids, self.embeddings(ids)

    def get_doc_dicts(self, doc_ids: np.ndarray) -> list[dict]:
        dicts = []
        for row in np.asarray(doc_ids):
            rows = self.rows([int(r) for r in row])
            dicts.append({c: [r[c] for r in rows] for c in ("title", "text", "passage_id", "page_id", "rev_id")})
        return dicts

    def __repr__(self) -> str:
        return f"VersionIndex({self.version!r}, rows={self.size})"


def _local_file(lease: Lease, store: IndexStore, manifest: Manifest, relpath: str) -> str:
    """A verified local path to a version file (in place for a local store, else a cached copy)."""
    version_id = manifest.version
    expected = expected_sha256(manifest, relpath)  # first: a name no checksum covers never touches a path
    remote = store.version_path(version_id, relpath)
    return lease.path(store.fs, remote, expected, f"version {version_id}: {relpath}")


def _map_passages(version_id: str, path: str) -> pa.Table:
    try:
        table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    except pa.ArrowInvalid as exc:
        raise Rejected(f"version {version_id}: {PASSAGE_TABLE} is not an Arrow IPC file: {exc}") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise Rejected(f"version {version_id}: {PASSAGE_TABLE} lacks columns {missing}")
    return table.select(list(TABLE_COLUMNS))


def _embedding_files(lease: Lease, store: IndexStore, manifest: Manifest) -> list[tuple[int, str]]:
    summary_path = _local_file(lease, store, manifest, layout.EMBEDDINGS_SUMMARY_PATH)
    summary = EmbeddingsSummary.read(LocalFileSystem(), summary_path)
    files, first = [], 0
    for shard in summary.shards:
        files.append((first, _local_file(lease, store, manifest, f"{layout.EMBEDDINGS_DIR}/{shard.name}")))
        first += shard.rows
    return files
