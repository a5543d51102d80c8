"""One loaded index version: its faiss index, its passages and its manifest, opened for serving.

Memory: the faiss index is read through `vector_search.read_index` with memory mapping, and the
passages through the memory-mapped `passages.arrow` (Arrow IPC file, uncompressed), so a row is
looked up by `row_id` without the table ever being copied into the heap. Only the pages that
searches and look-ups touch become resident, and they are file-backed: two versions side by side
during a swap do not double anonymous memory. The one exception is bounded: the live rows of a delta
lineage's small exact segments are copied into one in-memory index (at most
`rag_model.segments.PACK_MAX_ROWS` rows), so that they cost one search instead of one each.

Trust: every mapped file is a private read-only copy in the local file cache (`storage.cache`),
verified against its manifest when it is opened, never the store's own file: a store file changed or
truncated in place later changes nothing that is served (a mapped file truncated under a process
kills it with SIGBUS). `served_files` names the copies so they can be re-hashed while served
(`rag_model.served_bytes`).

The class implements transformers' RAG `Index` interface (`get_doc_dicts`, `get_top_docs`,
`init_index`, `is_initialized`) so `RagRetriever` machinery and RAG models use it like their own
indexes. `get_top_docs` needs the document vectors (RAG scores documents with them); those come
from the version's own `embeddings/part-*.npy`, memory-mapped on first use.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from transformers.models.rag.retrieval_rag import Index

from rag_model.lineage import open_segments
from rag_model.segments import Segment, SegmentSearch
from storage.cache import FileCache, PinnedFile
from storage.catalog import LineageSummary
from storage.denylist import denied_page_ids
from storage.errors import RagindexError, Rejected
from storage.layout import PASSAGE_TABLE
from storage.manifest import Manifest
from storage.store import IndexStore
from storage.timing import timed
from storage.verify import signed_manifest

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
    """A version opened read-only for searching. Immutable once opened; safe to share between threads.

    A full version is one segment; a delta version is its ancestors' segments plus its own, minus
    its tombstones, opened by `rag_model.lineage`. Row ids are global across the lineage."""

    def __init__(self, version: str, manifest: Manifest, segments: list[Segment],
                 denied: frozenset[int] = frozenset(), unfiltered: VersionIndex | None = None) -> None:
        self.version = version
        self.manifest = manifest
        self._segments = segments
        # Built here, once: the segment list never changes (a deny-list makes a new object), and packing
        # the small delta segments costs a copy of their rows that no query should pay for.
        self._search = SegmentSearch(segments)
        # Pages taken down (storage.denylist) whose rows this object drops at query time, and the object
        # as opened, before that: it owns the cache pins and is what a new deny-list is applied to.
        self.denied = denied
        self._unfiltered = unfiltered
        self._starts = np.array([s.first_row_id for s in segments], dtype=np.int64)
        self.lang = wiki_language(manifest.source.wiki)
        self.dim = manifest.encoder.dim
        self._embedding_shards: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._embedding_lock = threading.Lock()
        # the verified copies this version maps and reads (a filtered object maps its unfiltered one's)
        self.served_files: tuple[PinnedFile, ...] = unfiltered.served_files if unfiltered else ()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: IndexStore,
        version_id: str,
        cache_dir: str | None = None,
        with_embeddings: bool = False,
        cache: FileCache | None = None,
        rehash: bool = False,
        denied: Collection[int] | None = None,
    ) -> VersionIndex:
        """Open a ready version of `store`, every file it maps verified against the manifest first.

        Files are copied into the one local cache (`storage.cache`) and served from those private
        read-only copies, a local store's as well as a remote one's; a copy is hashed when it is made and
        again only when it changed (always, with `rehash`: a reload). `Corrupt` names the first file that
        does not match. A delta version's ancestors are reached through the manifest sha256s it recorded,
        so their files are checked against exactly the manifests it was built and validated on.
        With trusted keys, every manifest of the lineage must be signed by one (`storage.verify.signed_manifest`).
        `cache_dir` is the cache's base directory when no `cache` is given. The rows of `denied` pages
        (default: the store's deny-list for the version's wiki) are dropped at query time (`without_pages`)."""
        manifest = signed_manifest(store, version_id)
        if manifest.status != "ready":
            raise Rejected(f"version {version_id} is {manifest.status}, not ready: refusing to serve it")
        config = replace(store.cache, base=cache_dir) if cache_dir else store.cache
        pins = (cache or config.for_store(store.url)).pins(private=True, rehash=rehash)
        try:
            segments, _ = open_segments(store, manifest, pins, table=True, embeddings=with_embeddings)
            opened = cls(version_id, manifest, segments)
            if opened.size != manifest.live_passages:
                raise Rejected(f"version {version_id} is inconsistent: it serves {opened.size} rows, "
                               f"its manifest counts {manifest.live_passages}")
        except BaseException:
            pins.release()
            raise
        # The files stay pinned in the cache for as long as anything (an in-flight request) holds this object.
        opened.served_files = tuple(pins.files)
        weakref.finalize(opened, pins.release)
        if denied is None:
            denied = denied_page_ids(store, manifest.source.wiki)
        return opened.without_pages(denied)

    def without_pages(self, page_ids: Collection[int]) -> VersionIndex:
        """This version serving none of the rows of `page_ids` (pages taken down), and all the others.

        Why at query time: a version committed before a takedown (a rollback target, a replica that has
        not swapped yet) still holds the page's rows; dropping them like tombstones takes the page out
        within one poll of CURRENT, whatever version is served. Returns a new object (this one is
        immutable), built from the version as opened, so a lifted page comes back the same way."""
        wanted = frozenset(int(p) for p in page_ids)
        if wanted == self.denied:
            return self
        base = self._unfiltered or self
        if not wanted:
            return base
        pages = np.fromiter(wanted, dtype=np.int64)
        segments = []
        for segment in base._segments:
            found = [np.empty(0, dtype=np.int64)]
            for start, batch in zip(segment.batch_starts.tolist(), segment.batches, strict=False):
                column = batch.column(batch.schema.get_field_index("page_id")).to_numpy()
                found.append(np.flatnonzero(np.isin(column, pages)) + start)
            dropped = np.union1d(segment.dropped, np.concatenate(found)).astype(np.int64)
            segments.append(dataclasses.replace(segment, dropped=dropped) if len(dropped) > len(segment.dropped)
                            else segment)
        return VersionIndex(base.version, base.manifest, segments, denied=wanted, unfiltered=base)

    # -- searching -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Rows served (live rows across segments)."""
        return sum(s.live for s in self._segments)

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def search_ids(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner-product scores [n, k], row ids [n, k]); -1 marks a slot with no result."""
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise Rejected(f"query vectors have shape {queries.shape}; version {self.version} needs [n, {self.dim}]")
        return self._search.search(queries, k)

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

    def _locate(self, row_id: int) -> tuple[Segment, int]:
        """The segment holding a row id and the row's position in it."""
        at = int(np.searchsorted(self._starts, row_id, side="right")) - 1
        if at >= 0:
            segment = self._segments[at]
            position = row_id - segment.first_row_id
            if position < segment.rows:
                return segment, position
        raise RagindexError(f"version {self.version}: no row {row_id} in {PASSAGE_TABLE}")

    def rows(self, row_ids: list[int]) -> list[dict[str, Any]]:
        """Passages by row_id, read from the mapped files (only the touched pages become resident)."""
        taken = []
        for row_id in row_ids:
            segment, position = self._locate(int(row_id))
            row = segment.row(position)
            if row["row_id"] != row_id:  # never serve a wrong passage
                raise RagindexError(f"version {self.version}: {PASSAGE_TABLE} row {row_id} has row_id {row['row_id']}")
            taken.append(row)
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
        """Document vectors [.., dim] for row ids (from the embedding shards of the segments holding them)."""
        flat = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        for i, row_id in enumerate(flat.tolist()):
            if row_id < 0:
                continue
            segment, position = self._locate(row_id)
            shards = self._mapped_embeddings(segment)
            starts = [s for s, _ in shards]
            shard = int(np.searchsorted(starts, position, side="right") - 1)
            first, array = shards[shard]
            out[i] = array[position - first]
        return out.reshape(*np.shape(row_ids), self.dim)

    def _mapped_embeddings(self, segment: Segment) -> list[tuple[int, np.ndarray]]:
        with self._embedding_lock:
            key = segment.first_row_id
            if key not in self._embedding_shards:
                shards = segment.embeddings
                if shards is None:
                    raise RagindexError(f"version {self.version} was opened without its embeddings")
                self._embedding_shards[key] = [(shards.offsets[i], shards.read(i)) for i in range(len(shards.names))]
            return self._embedding_shards[key]

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
            "lineage": LineageSummary.of(m).to_json(),
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
