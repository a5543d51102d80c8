"""The rows a version serves, read the way validation needs them: across its segments, minus tombstones.

A full version is one segment (its own directory, rows 0..n-1). A delta version adds its ancestors'
segments (`Manifest.segments`, each checked against the manifest sha256 the delta recorded) and drops
the row ids in its `tombstones.npy`. Validation samples, gathers vectors, computes exact neighbours
and looks up content hashes and titles through this one view, and searches through
`rag_model.segments.search_segments` exactly as serving does.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from rag_model.index import map_passage_table
from rag_model.segments import Segment, dropped_positions
from rag_model.vector_search import read_index
from rag_model.vectors import EmbeddingShards, load_tombstones, open_embeddings, sample_rows, verified_embeddings
from storage import layout
from storage.cache import FileCache
from storage.errors import Corrupt
from storage.manifest import Manifest
from storage.verify import expected_sha256, read_verified, segment_manifests, verified_local_file
from tasks.passage_table import passage_shard_paths


@dataclass
class _SegmentRows:
    manifest: Manifest
    shards: EmbeddingShards
    segment: Segment
    passage_files: list[tuple[Any, str]]  # (filesystem, path) of each passage shard, in row order


class LineageRows:
    """Segments, vectors and passage columns of one (staged or committed) version.

    The version's own files are read as they are: its caller has just checksummed them (validation
    compares them with the manifest first). Its ancestors' are committed files shared with other
    versions, so each is checked against the ancestor's manifest before it is read, through the local
    file cache (hashed once per unchanged file: validating the next delta re-hashes nothing)."""

    def __init__(self, store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        tombstones = self.tombstones_of(store, manifest)
        self.tombstones = tombstones
        lease = FileCache.for_store(store.url).lease()
        weakref.finalize(self, lease.release)  # the ancestors' files stay pinned while this is in use
        self.parts: list[_SegmentRows] = []
        for m in [*segment_manifests(store, manifest), manifest]:
            if m is manifest:
                shards = open_embeddings(store.version_url(m.version, layout.EMBEDDINGS_DIR), store.s3_endpoint_url)
                index = read_index(store.version_url(m.version, layout.INDEX_FILE),
                                   s3_endpoint_url=store.s3_endpoint_url)
                directory = store.version_path(m.version, layout.PASSAGES_DIR)
                passage_files = [(store.fs, p) for p in passage_shard_paths(store.fs, directory)]
            else:
                shards = verified_embeddings(lease, store, m)
                index = read_index(verified_local_file(lease, store, m, layout.INDEX_FILE))
                local = LocalFileSystem()
                passage_files = [(local, verified_local_file(lease, store, m, rel)) for rel in _passage_parts(m)]
            rows = shards.total
            segment = Segment(version=m.version, first_row_id=m.first_row_id, rows=rows, index=index, info=m.index,
                              dropped=dropped_positions(tombstones, m.first_row_id, rows))
            self.parts.append(_SegmentRows(m, shards, segment, passage_files))

    @staticmethod
    def tombstones_of(store, manifest: Manifest) -> np.ndarray:
        """A delta's tombstones (empty for a full version); a committed delta's are checked against its
        manifest, a staged one's are the bytes this build just wrote."""
        if not manifest.is_delta:
            return np.empty(0, dtype=np.int64)
        path = store.version_path(manifest.version, layout.TOMBSTONES)
        if manifest.files or manifest.status == "ready":
            data = read_verified(store.fs, path, expected_sha256(manifest, layout.TOMBSTONES),
                                 f"version {manifest.version}: {layout.TOMBSTONES}")
        else:
            try:
                data = store.fs.cat_file(path)
            except FileNotFoundError:
                raise Corrupt(f"version {manifest.version} is a delta without {layout.TOMBSTONES}") from None
        return load_tombstones(io.BytesIO(data), manifest.version)

    @property
    def own(self) -> _SegmentRows:
        return self.parts[-1]

    @property
    def segments(self) -> list[Segment]:
        return [p.segment for p in self.parts]

    @property
    def live(self) -> int:
        return sum(p.segment.live for p in self.parts)

    def live_ids(self) -> np.ndarray:
        return np.concatenate([self._live_positions(p) + p.segment.first_row_id for p in self.parts])

    @staticmethod
    def _live_positions(part: _SegmentRows) -> np.ndarray:
        keep = np.ones(part.segment.rows, dtype=bool)
        keep[part.segment.dropped] = False
        return np.flatnonzero(keep).astype(np.int64)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n live row ids; for a delta, half of them (at most) from its own new rows."""
        live = self.live_ids()
        if not self.manifest.is_delta:
            return live[sample_rows(len(live), n, seed)]
        own = self.own.segment
        new = sample_rows(own.rows, n // 2, seed) + own.first_row_id
        rest = np.setdiff1d(live, new)
        return np.sort(np.concatenate([new, rest[sample_rows(len(rest), n - len(new), seed + 1)]]))

    def _split(self, row_ids: np.ndarray) -> Iterator[tuple[_SegmentRows, np.ndarray, np.ndarray]]:
        """(segment, indices into row_ids, positions in the segment) for each segment holding some."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        starts = np.array([p.segment.first_row_id for p in self.parts])
        at = np.searchsorted(starts, row_ids, side="right") - 1
        for i, part in enumerate(self.parts):
            sel = np.flatnonzero((at == i) & (row_ids >= 0))
            if len(sel):
                yield part, sel, row_ids[sel] - part.segment.first_row_id

    def gather(self, row_ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(row_ids), self.manifest.encoder.dim), dtype=np.float32)
        for part, sel, positions in self._split(row_ids):
            out[sel] = part.shards.gather(positions)
        return out

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(live row ids, their vectors) block by block over every segment."""
        for part in self.parts:
            dropped = part.segment.dropped
            for start, block in part.shards.blocks():
                positions = np.arange(start, start + len(block), dtype=np.int64)
                keep = ~part.segment.is_dropped(positions) if len(dropped) else slice(None)
                yield positions[keep] + part.segment.first_row_id, block[keep]

    def column(self, name: str, row_ids: np.ndarray) -> dict[int, object]:
        """A passage column's values for the given row ids, reading only the shards that hold them."""
        out: dict[int, object] = {}
        for part, _, positions in self._split(np.unique(np.asarray(row_ids)[np.asarray(row_ids) >= 0])):
            start = 0
            for fs, shard in part.passage_files:
                with fs.open(shard, "rb") as f:
                    pf = pq.ParquetFile(f)
                    count = pf.metadata.num_rows
                    here = positions[(positions >= start) & (positions < start + count)]
                    if len(here):
                        values = pf.read(columns=[name]).column(0)
                        for p in here.tolist():
                            out[p + part.segment.first_row_id] = values[p - start].as_py()
                start += count
        return out


def _passage_parts(m: Manifest) -> list[str]:
    """The passage shards a committed version's manifest names, in row order."""
    return [rel for rel in sorted(m.files)
            if rel.partition("/")[0] == layout.PASSAGES_DIR and layout.is_passage_part(rel.partition("/")[2])]


def passage_columns(store, manifests: list[Manifest], columns: list[str]) -> Iterator[tuple[Manifest, pa.Table]]:
    """Columns of the passage table (`passages.arrow`, row ids included) of each given committed version,
    the file checked against the manifest that names it before a byte of it is used. It is memory-mapped
    through the local file cache, so only the columns asked for are read and an unchanged file is hashed
    once, not on every night's delta."""
    lease = FileCache.for_store(store.url).lease()
    try:
        for m in manifests:
            table = map_passage_table(m.version, verified_local_file(lease, store, m, layout.PASSAGE_TABLE))
            yield m, table.select(columns)
    finally:
        lease.release()


def served_page_ids(store, manifest: Manifest) -> np.ndarray:
    """Sorted ids of the pages a committed version serves (its segments' rows minus its tombstones)."""
    tombstones = LineageRows.tombstones_of(store, manifest)
    pages = [np.empty(0, dtype=np.int64)]
    for _, table in passage_columns(store, [*segment_manifests(store, manifest), manifest], ["row_id", "page_id"]):
        live = ~np.isin(table.column("row_id").to_numpy(), tombstones)
        pages.append(table.column("page_id").to_numpy()[live])
    return np.unique(np.concatenate(pages))
