"""The rows a version serves, read the way validation needs them: across its segments, minus tombstones.

A full version is one segment (its own directory, rows 0..n-1). A delta version adds its ancestors'
segments (`Manifest.segments`, each checked against the manifest sha256 the delta recorded) and drops
the row ids in its `tombstones.npy`. Validation samples, gathers vectors, computes exact neighbours
and looks up content hashes and titles through this one view, and searches through
`rag_model.segments.search_segments` exactly as serving does.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_model.segments import Segment, dropped_positions
from rag_model.vector_search import read_index
from rag_model.vectors import EmbeddingShards, load_tombstones, open_embeddings, sample_rows
from storage import layout
from storage.errors import Corrupt
from storage.manifest import Manifest
from storage.verify import expected_sha256, read_verified, segment_manifests
from tasks.passage_table import passage_shard_paths


@dataclass
class _SegmentRows:
    manifest: Manifest
    shards: EmbeddingShards
    segment: Segment


class LineageRows:
    """Segments, vectors and passage columns of one (staged or committed) version."""

    def __init__(self, store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        tombstones = self.tombstones_of(store, manifest)
        self.tombstones = tombstones
        self.parts: list[_SegmentRows] = []
        for m in [*segment_manifests(store, manifest), manifest]:
            shards = open_embeddings(store.version_url(m.version, layout.EMBEDDINGS_DIR), store.s3_endpoint_url)
            index = read_index(store.version_url(m.version, layout.INDEX_FILE), s3_endpoint_url=store.s3_endpoint_url)
            rows = shards.total
            segment = Segment(version=m.version, first_row_id=m.first_row_id, rows=rows, index=index, info=m.index,
                              dropped=dropped_positions(tombstones, m.first_row_id, rows))
            self.parts.append(_SegmentRows(m, shards, segment))

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
            version = part.manifest.version
            start = 0
            for shard in passage_shard_paths(self.store.fs, self.store.version_path(version, layout.PASSAGES_DIR)):
                with self.store.fs.open(shard, "rb") as f:
                    pf = pq.ParquetFile(f)
                    count = pf.metadata.num_rows
                    here = positions[(positions >= start) & (positions < start + count)]
                    if len(here):
                        values = pf.read(columns=[name]).column(0)
                        for p in here.tolist():
                            out[p + part.segment.first_row_id] = values[p - start].as_py()
                start += count
        return out


def passage_columns(store, manifests: list[Manifest], columns: list[str]) -> Iterator[tuple[Manifest, pa.Table]]:
    """Columns of every passage shard of the given committed versions, each shard verified against the
    manifest that names it before a byte of it is used."""
    for m in manifests:
        for shard in sorted(m.files):
            folder, _, name = shard.partition("/")
            if folder != layout.PASSAGES_DIR or not layout.is_passage_part(name):
                continue
            data = read_verified(store.fs, store.version_path(m.version, shard), m.files[shard],
                                 f"version {m.version}: {shard}")
            yield m, pq.read_table(io.BytesIO(data), columns=columns)


def served_page_ids(store, manifest: Manifest) -> np.ndarray:
    """Sorted ids of the pages a committed version serves (its segments' rows minus its tombstones)."""
    tombstones = LineageRows.tombstones_of(store, manifest)
    pages = [np.empty(0, dtype=np.int64)]
    for _, table in passage_columns(store, [*segment_manifests(store, manifest), manifest], ["row_id", "page_id"]):
        live = ~np.isin(table.column("row_id").to_numpy(), tombstones)
        pages.append(table.column("page_id").to_numpy()[live])
    return np.unique(np.concatenate(pages))
