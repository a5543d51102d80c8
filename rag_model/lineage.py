"""A version's lineage, in one place: its ancestors' segments, then its own rows, minus its tombstones.

A full version is one segment: its own directory, rows 0..n-1. A delta version serves the own rows of
every ancestor its manifest lists (`Manifest.segments`, each pinned by the sha256 of that ancestor's
manifest), then its own, minus the row ids in its `tombstones.npy`. Every reader of a version across
its segments comes through here: serving (`rag_model.index.VersionIndex.open`), validation
(`tasks.lineage_rows`), a delta's planning (`tasks.delta_version`) and the deletions a full build
reconciles (`tasks.assemble_version`).

Committed files are read through the local file cache (`storage.cache`): each is checked against the
manifest that names it before it is used, and an unchanged file is hashed (on S3, fetched) once. The one
exception is a version being validated: its caller has just checksummed its own files into the draft
manifest, so they are read from the store as they are (`own_checked`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from rag_model.segments import Segment, dropped_positions
from rag_model.vector_search import read_index
from rag_model.vectors import load_tombstones, open_embeddings, verified_embeddings
from storage import layout
from storage.cache import FileCache, Pins
from storage.errors import Rejected
from storage.location import Location
from storage.manifest import Manifest
from storage.store import IndexStore
from storage.verify import expected_sha256, read_verified, segment_manifests


def lineage_manifests(store: IndexStore, manifest: Manifest) -> list[Manifest]:
    """The manifests whose own rows `manifest` serves: its ancestors', oldest first, each checked against
    the sha256 it pinned (a rewritten or missing one is `Corrupt`) and, where keys are trusted, its
    signature (`Untrusted`), then its own (whose reader checked its signature: `signed_manifest`)."""
    return [*segment_manifests(store, manifest), manifest]


def read_tombstones(pins: Pins, store: IndexStore, manifest: Manifest, own_checked: bool = False) -> np.ndarray:
    """The sorted row ids a delta version no longer serves (none for a full version), checked against its
    manifest (`own_checked`: read from the store, against the digest its caller just recorded)."""
    if not manifest.is_delta:
        return np.empty(0, dtype=np.int64)
    if own_checked:
        label = f"version {manifest.version}: {layout.TOMBSTONES}"
        data = read_verified(store.fs, store.version_path(manifest.version, layout.TOMBSTONES),
                             expected_sha256(manifest, layout.TOMBSTONES), label)
        return load_tombstones(io.BytesIO(data), manifest.version)
    return load_tombstones(pins.version_file(store, manifest, layout.TOMBSTONES), manifest.version)


def open_segments(store: IndexStore, manifest: Manifest, pins: Pins, *, table: bool = False,
                  embeddings: bool = False, passage_files: bool = False,
                  own_checked: bool = False) -> tuple[list[Segment], np.ndarray]:
    """Every segment `manifest` serves, oldest first, and its tombstones.

    `table` maps each segment's passages.arrow (serving's row look-ups, checked against the index and
    the manifest's count), `embeddings` opens its vectors, `passage_files` lists its parquet shards
    (validation's columns). The files stay pinned in the cache until `pins` is released."""
    tombstones = read_tombstones(pins, store, manifest, own_checked)
    segments = []
    for m in lineage_manifests(store, manifest):
        if m.encoder.key != manifest.encoder.key:
            raise Rejected(f"version {manifest.version}: segment {m.version} was encoded by another encoder "
                           f"({m.encoder.key}, not {manifest.encoder.key})")
        if own_checked and m is manifest:
            segments.append(_open_checked(store, m, tombstones, embeddings, passage_files))
        else:
            segments.append(_open_verified(pins, store, m, tombstones, table, embeddings, passage_files))
    return segments, tombstones


def _open_verified(pins: Pins, store: IndexStore, m: Manifest, tombstones: np.ndarray, table: bool,
                   embeddings: bool, passage_files: bool) -> Segment:
    """A committed version's own rows, every file checked against its manifest before it is used."""
    index = read_index(Location(pins.version_file(store, m, layout.INDEX_FILE)), mmap=True)
    rows = m.counts.get("passages", 0)
    batches: list[pa.RecordBatch] = []
    if table:
        passages = map_passage_table(m.version, pins.version_file(store, m, layout.PASSAGE_TABLE))
        if passages.num_rows != rows or index.ntotal != passages.num_rows:
            raise Rejected(f"version {m.version} is inconsistent: {index.ntotal} vectors, "
                           f"{passages.num_rows} rows in {layout.PASSAGE_TABLE}, manifest counts {rows}")
        # Table.take concatenates every chunk of a column first (O(table) per call): rows are looked up per batch.
        batches = passages.to_batches()
    local = LocalFileSystem()
    return Segment(version=m.version, first_row_id=m.first_row_id, rows=rows, index=index, info=m.index,
                   dropped=dropped_positions(tombstones, m.first_row_id, rows),
                   embeddings=verified_embeddings(pins, store, m) if embeddings else None, batches=batches,
                   passage_files=[(local, pins.version_file(store, m, rel)) for rel in _passage_parts(m)]
                   if passage_files else [])


def _open_checked(store: IndexStore, m: Manifest, tombstones: np.ndarray, embeddings: bool,
                  passage_files: bool) -> Segment:
    """The own rows of a version being validated, read from the store as they are (just checksummed)."""
    shards = open_embeddings(store.at(m.version, layout.EMBEDDINGS_DIR))
    index = read_index(store.at(m.version, layout.INDEX_FILE))
    directory = store.version_path(m.version, layout.PASSAGES_DIR)
    return Segment(version=m.version, first_row_id=m.first_row_id, rows=shards.total, index=index, info=m.index,
                   dropped=dropped_positions(tombstones, m.first_row_id, shards.total),
                   embeddings=shards if embeddings else None,
                   passage_files=[(store.fs, p) for p in layout.passage_shard_paths(store.fs, directory)]
                   if passage_files else [])


def _passage_parts(m: Manifest) -> list[str]:
    """The passage shards a committed version's manifest names, in row order."""
    return [rel for rel in sorted(m.files)
            if rel.partition("/")[0] == layout.PASSAGES_DIR and layout.is_passage_part(rel.partition("/")[2])]


def map_passage_table(version_id: str, path: str) -> pa.Table:
    """A version's passages.arrow, memory-mapped, with the columns serving reads (`Rejected` otherwise)."""
    try:
        table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    except pa.ArrowInvalid as exc:
        raise Rejected(f"version {version_id}: {layout.PASSAGE_TABLE} is not an Arrow IPC file: {exc}") from None
    missing = [c for c in layout.TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise Rejected(f"version {version_id}: {layout.PASSAGE_TABLE} lacks columns {missing}")
    return table.select(list(layout.TABLE_COLUMNS))


def served_rows(store: IndexStore, manifest: Manifest, columns: list[str]) -> Iterator[pa.Table]:
    """`row_id` and `columns` of the rows a committed version serves, segment by segment, oldest first
    (tombstoned rows left out). Each segment's passages.arrow is memory-mapped through the local file
    cache, so only the columns asked for are read and an unchanged file is hashed once, not every night."""
    pins = FileCache.for_store(store.url).pins()
    try:
        tombstones = read_tombstones(pins, store, manifest)
        for m in lineage_manifests(store, manifest):
            table = map_passage_table(m.version, pins.version_file(store, m, layout.PASSAGE_TABLE))
            table = table.select(["row_id", *[c for c in columns if c != "row_id"]])
            if len(tombstones):
                table = table.filter(pa.array(~np.isin(table.column("row_id").to_numpy(), tombstones)))
            yield table
    finally:
        pins.release()


def served_page_ids(store: IndexStore, manifest: Manifest) -> np.ndarray:
    """Sorted ids of the pages a committed version serves."""
    pages = [table.column("page_id").to_numpy() for table in served_rows(store, manifest, ["page_id"])]
    return np.unique(np.concatenate([np.empty(0, dtype=np.int64), *pages]))
