"""The own rows of a delta that adds nothing: one empty passage shard, its empty vectors and summaries.

A delta whose days only remove pages, and a takedown version (`tasks.takedown`), tombstone ancestor
rows and add none. Writing an empty shard of each kind, rather than none, keeps them on the one
assembly path: the index derived over no vectors, the empty passage table and reuse hash table,
validation's counts (0 = 0 = 0 = 0) and serving's segments all work as for any delta, and nothing
needs the document encoder (its fingerprint is the parent's, checked like every shard's): a takedown
never imports torch, which would cost it seconds.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import layout
from storage.fs import atomic_write, file_digest, join
from storage.manifest import Manifest, SourceDump
from storage.records import EmbeddingSidecar, EmbeddingsSummary, PassagesSummary, ShardEntry
from storage.store import IndexStore


def write_empty_rows(store: IndexStore, version_id: str, parent: Manifest, source: SourceDump,
                     skipped: dict[str, int] | None = None) -> None:
    """passages/ and embeddings/ of a staged delta of `parent` with no rows of its own."""
    name = layout.passage_part(0)
    passages_dir = store.version_path(version_id, layout.PASSAGES_DIR)
    embeddings_dir = store.version_path(version_id, layout.EMBEDDINGS_DIR)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([], schema=layout.PASSAGE_SCHEMA), buffer, compression="zstd")
    _write(store, join(passages_dir, name), buffer.getvalue())
    passages_sha = file_digest(store.fs, join(passages_dir, name))
    summary = PassagesSummary(source=source, passages=0, shards=[ShardEntry(name=name, rows=0, sha256=passages_sha)])
    summary.articles.skipped = dict(skipped or {})
    _write(store, join(passages_dir, layout.PASSAGES_SUMMARY), json.dumps(summary.dump(), indent=2).encode())

    fingerprint = parent.encoder
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((0, fingerprint.dim), dtype=np.float32), allow_pickle=False)
    vectors = layout.embedding_shard(name)
    _write(store, join(embeddings_dir, vectors), buffer.getvalue())
    vectors_sha = file_digest(store.fs, join(embeddings_dir, vectors))
    sidecar = EmbeddingSidecar(passages_sha256=passages_sha, fingerprint_key=fingerprint.key, rows=0,
                               dim=fingerprint.dim, sha256=vectors_sha)
    _write(store, join(embeddings_dir, layout.sidecar(vectors)), json.dumps(sidecar.dump(), indent=2).encode())
    embeddings = EmbeddingsSummary(fingerprint=fingerprint, question_encoder=parent.question_encoder,
                                   dim=fingerprint.dim, rows=0, shards=[ShardEntry(name=vectors, rows=0,
                                                                                   sha256=vectors_sha)])
    _write(store, join(embeddings_dir, layout.EMBEDDINGS_SUMMARY), json.dumps(embeddings.dump(), indent=2).encode())


def _write(store: IndexStore, path: str, data: bytes) -> None:
    with atomic_write(store.fs, path) as f:
        f.write(data)
