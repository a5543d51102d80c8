"""Trained-but-empty faiss indexes kept in the store per encoder fingerprint: train once, add many.

    <store>/trained/<fingerprint key>/<entry>.faiss   the trained index with no vectors (coarse
                                                      quantizer + SQ/PQ codebooks): data, not code
    <store>/trained/<fingerprint key>/<entry>.json    TrainedRecord: factory, sha256, training size,
                                                      recall when it was trained

`entry` is the factory string (made a file name) for an explicit spec, `auto-IVF<nlist>` for auto
(which records the factory it chose). A later build of the same fingerprint and entry adds its
vectors to a copy of the stored index instead of training; when the result does not reach the
target recall, the build trains afresh and replaces the entry. A record that does not verify
(sha256, dimension, untrained, not empty) is as good as absent.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime

import faiss
import numpy as np
from pydantic import Field

from storage import layout
from storage.errors import RagindexError
from storage.fs import atomic_write, join
from storage.location import Location
from storage.records import Record

log = logging.getLogger(__name__)


class TrainedRecord(Record):
    factory: str
    fingerprint_key: str
    dim: int
    sha256: str
    bytes: int
    train_size: int
    recall_at_training: float | None = None
    trained_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def entry_name(factory: str) -> str:
    """A factory string as a file name stem: `IVF4096,SQ8` -> `IVF4096_SQ8`."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", factory).strip("_") or "index"


def _paths(trained: Location, key: str, entry: str):
    fs, root = trained.fs, trained.path
    base = join(root, layout.trained_entry_dir(key))
    return fs, join(base, entry + ".faiss"), join(base, entry + ".json")


def load_trained(trained: Location, key: str, entry: str, dim: int) -> tuple[faiss.Index, TrainedRecord] | None:
    """The stored trained index of `entry` for fingerprint `key`, verified; None when there is none usable."""
    fs, index_path, record_path = _paths(trained, key, entry)
    try:
        record = TrainedRecord.read(fs, record_path)
        with fs.open(index_path, "rb") as f:
            data = f.read()
    except (RagindexError, FileNotFoundError):
        return None
    if hashlib.sha256(data).hexdigest() != record.sha256 or record.fingerprint_key != key or record.dim != dim:
        log.warning("trained index %s does not match its record; training again", index_path)
        return None
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        log.warning("trained index %s cannot be read (%s); training again", index_path, exc)
        return None
    if not index.is_trained or index.ntotal != 0 or index.d != dim:
        log.warning("trained index %s is not a trained empty %d-d index; training again", index_path, dim)
        return None
    return index, record


def save_trained(where: Location, key: str, entry: str, factory: str, trained: bytes, dim: int, train_size: int,
                 recall: float | None) -> TrainedRecord:
    """Store a serialized trained empty index (index first, record last: a torn pair never verifies)."""
    fs, index_path, record_path = _paths(where, key, entry)
    with atomic_write(fs, index_path) as f:
        f.write(trained)
    record = TrainedRecord(factory=factory, fingerprint_key=key, dim=dim, sha256=hashlib.sha256(trained).hexdigest(),
                           bytes=len(trained), train_size=train_size, recall_at_training=recall)
    with atomic_write(fs, record_path) as f:
        f.write(record.model_dump_json(indent=2).encode())
    return record
