"""The store layout: every file and directory name inside `versions/<id>/`, the store-level
directories beside `versions/` that other modules write into, and the passage columns.

Every other module asks this one for a name instead of spelling it, so the layout (which delta
versions will change) is written down in one place:

    versions/<id>/
      _staging.json                     present while the version is being written
      manifest.json                     written LAST: a version exists only if its manifest does
      manifest.sig                      its Ed25519 signature, written just before it (storage.signing)
      passages/part-NNNNN.parquet       PASSAGE_SCHEMA, own row i has row_id first_row_id + i
      passages/passages.json            the passages summary (storage.records.PassagesSummary)
      embeddings/part-NNNNN.npy         float32 [rows, dim], row i <-> passages row i
      embeddings/part-NNNNN.json        its sidecar (storage.records.EmbeddingSidecar)
      embeddings/embeddings.json        the embeddings summary (storage.records.EmbeddingsSummary)
      embeddings/_ray/part-NNNNN.npy    reused vectors of a shard a Ray Data job is encoding (removed after it)
      embeddings/hash_keys.npy          sorted content hashes, fixed-width bytes (tasks.reuse_index)
      embeddings/hash_rows.npy          int32 [n, 2] (shard, row) of each key: where reuse finds a vector
      index.faiss                       faiss ids == global row_id (a delta's: row_id - first_row_id)
      tombstones.npy                    a delta's: int64 sorted row ids of its ancestors it no longer serves
      passages.arrow                    TABLE_SCHEMA, uncompressed Arrow IPC, memory-mapped by serving
      _work/                            unit outputs of an unfinished build (removed before validation)
    trained/<fingerprint key>/...       trained IVF quantizers (tasks.trained_store)
    prefect-results/                    JSON-only task results of refresh runs (flows.results)

(storage.store lists the rest of the store root: downloads, CURRENT, history, pins, locks.)
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from storage.errors import RagindexError
from storage.fs import to_url

VERSIONS_DIR = "versions"
MANIFEST = "manifest.json"
MANIFEST_SIGNATURE = "manifest.sig"
STAGING_MARKER = "_staging.json"
# In a version's directory but not part of its data: what its checksums and sizes leave out.
BOOKKEEPING_FILES = (MANIFEST, MANIFEST_SIGNATURE, STAGING_MARKER)
PASSAGES_DIR = "passages"
EMBEDDINGS_DIR = "embeddings"
WORK_DIR = "_work"
RAY_STAGING_DIR = "_ray"
PASSAGES_SUMMARY = "passages.json"
EMBEDDINGS_SUMMARY = "embeddings.json"
INDEX_FILE = "index.faiss"
PASSAGE_TABLE = "passages.arrow"
HASH_KEYS = "hash_keys.npy"
HASH_ROWS = "hash_rows.npy"
TOMBSTONES = "tombstones.npy"
# Beside versions/, not inside one: <store>/trained/<fingerprint key>/<entry>.faiss|.json (tasks.trained_store).
TRAINED_DIR = "trained"
# Beside versions/ too: Prefect's persisted task results, which name the versions they were made for.
RESULTS_DIR = "prefect-results"

PASSAGES_SUMMARY_PATH = f"{PASSAGES_DIR}/{PASSAGES_SUMMARY}"
EMBEDDINGS_SUMMARY_PATH = f"{EMBEDDINGS_DIR}/{EMBEDDINGS_SUMMARY}"
# What validation requires besides the shards the summaries list.
REQUIRED_FILES = (INDEX_FILE, PASSAGE_TABLE, PASSAGES_SUMMARY_PATH, EMBEDDINGS_SUMMARY_PATH)

# Rows per passage shard (and so per embedding shard) when the caller does not say: the unit that
# embedding resumes and verifies whole.
DEFAULT_SHARD_ROWS = 100_000

_PASSAGE_PART = re.compile(r"^part-(\d{5})\.parquet$")

# The passage-shard contract: this column order, these types.
PASSAGE_SCHEMA = pa.schema([
    ("row_id", pa.int64()),
    ("passage_id", pa.string()),
    ("page_id", pa.int64()),
    ("rev_id", pa.int64()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("content_hash", pa.string()),
])
# What one work unit writes: everything but the global row_id, assigned when units are assembled.
UNIT_SCHEMA = pa.schema([f for f in PASSAGE_SCHEMA if f.name != "row_id"])
# passages.arrow: what serving shows and cites (content_hash only matters for reusing embeddings).
TABLE_SCHEMA = pa.schema([f for f in PASSAGE_SCHEMA if f.name != "content_hash"])
TABLE_COLUMNS = tuple(TABLE_SCHEMA.names)
# The columns embedding reads, with their contract types.
EMBED_COLUMNS = {name: PASSAGE_SCHEMA.field(name).type for name in ("row_id", "title", "text", "content_hash")}


def passage_part(n: int) -> str:
    """The name of the n-th passage shard."""
    return f"part-{n:05d}.parquet"


def is_passage_part(name: str) -> bool:
    return bool(_PASSAGE_PART.match(name))


def stem(name: str) -> str:
    """`part-00003.parquet` -> `part-00003`: the key a passage shard, its vectors and sidecar share."""
    return name.rsplit(".", 1)[0]


def embedding_shard(passage_shard: str) -> str:
    """The .npy holding the vectors of a passage shard."""
    return stem(passage_shard) + ".npy"


def sidecar(embedding_shard_name: str) -> str:
    """The sidecar JSON beside an embedding shard."""
    return stem(embedding_shard_name) + ".json"


def passage_shard(embedding_shard_name: str) -> str:
    """The passage shard an embedding shard was computed from."""
    return stem(embedding_shard_name) + ".parquet"


def split_version_url(url: str) -> tuple[str, str] | None:
    """`<root>/versions/<id>/...` -> (`<root>`, `<id>`); None for a URL outside any version directory.
    The last `/versions/` counts, so a store whose own root path contains one still splits right."""
    root, sep, rest = url.rpartition(f"/{VERSIONS_DIR}/")
    return (root, rest.split("/", 1)[0]) if sep else None


def trained_entry_dir(fingerprint_key: str) -> str:
    """The directory under TRAINED_DIR holding the trained indexes of one encoder fingerprint."""
    if not re.fullmatch(r"[0-9a-f]{1,64}", fingerprint_key):
        raise ValueError(f"not a fingerprint key: {fingerprint_key!r}")
    return fingerprint_key


def passage_shard_paths(fs: Any, directory: str) -> list[str]:
    """Paths of the `part-NNNNN.parquet` shards in `directory`, in row order."""
    try:
        found = sorted(p.rstrip("/") for p in fs.ls(directory, detail=False))
    except FileNotFoundError:
        raise RagindexError(f"passages directory not found: {to_url(fs, directory)}") from None
    shards = [p for p in found if is_passage_part(p.rsplit("/", 1)[-1])]
    if not shards:
        raise RagindexError(f"no passage shards (part-*.parquet) in {to_url(fs, directory)}")
    return shards
