"""The rows a version serves, read the way validation needs them: across its segments, minus tombstones.

The segments are opened by `rag_model.lineage` exactly as serving opens them (the version's own files
as its caller just checksummed them, its ancestors' checked against their manifests); this view adds
what validation does with them: sample rows, gather vectors, stream every live vector for exact
neighbours, and read passage columns (content hashes, titles) of given rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterator

import numpy as np
import pyarrow.parquet as pq

from rag_model.lineage import open_segments
from rag_model.segments import Segment
from rag_model.vectors import sample_rows
from storage.manifest import Manifest
from storage.store import IndexStore


class LineageRows:
    """Segments, vectors and passage columns of one (staged or committed) version under validation."""

    def __init__(self, store: IndexStore, manifest: Manifest) -> None:
        self.manifest = manifest
        pins = store.file_cache().pins()
        try:
            self.segments, self.tombstones = open_segments(store, manifest, pins, embeddings=True,
                                                           passage_files=True, own_checked=True)
        except BaseException:
            pins.release()
            raise
        weakref.finalize(self, pins.release)  # the ancestors' files stay pinned while this is in use
        self._starts = np.array([s.first_row_id for s in self.segments], dtype=np.int64)

    @property
    def own(self) -> Segment:
        return self.segments[-1]

    @property
    def live(self) -> int:
        return sum(s.live for s in self.segments)

    def live_ids(self) -> np.ndarray:
        return np.concatenate([s.live_positions() + s.first_row_id for s in self.segments])

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n live row ids; for a delta, half of them (at most) from its own new rows."""
        live = self.live_ids()
        if not self.manifest.is_delta:
            return live[sample_rows(len(live), n, seed)]
        own = self.own
        new = sample_rows(own.rows, n // 2, seed) + own.first_row_id
        rest = np.setdiff1d(live, new)
        return np.sort(np.concatenate([new, rest[sample_rows(len(rest), n - len(new), seed + 1)]]))

    def _split(self, row_ids: np.ndarray) -> Iterator[tuple[Segment, np.ndarray, np.ndarray]]:
        """(segment, indices into row_ids, positions in the segment) for each segment holding some."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        at = np.searchsorted(self._starts, row_ids, side="right") - 1
        for i, segment in enumerate(self.segments):
            sel = np.flatnonzero((at == i) & (row_ids >= 0))
            if len(sel):
                yield segment, sel, row_ids[sel] - segment.first_row_id

    def gather(self, row_ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(row_ids), self.manifest.encoder.dim), dtype=np.float32)
        for segment, sel, positions in self._split(row_ids):
            out[sel] = segment.embeddings.gather(positions)
        return out

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(live row ids, their vectors) block by block over every segment."""
        for segment in self.segments:
            for start, block in segment.embeddings.blocks():
                positions = np.arange(start, start + len(block), dtype=np.int64)
                keep = ~segment.is_dropped(positions) if len(segment.dropped) else slice(None)
                yield positions[keep] + segment.first_row_id, block[keep]

    def column(self, name: str, row_ids: np.ndarray) -> dict[int, object]:
        """A passage column's values for the given row ids, reading only the shards that hold them."""
        out: dict[int, object] = {}
        for segment, _, positions in self._split(np.unique(np.asarray(row_ids)[np.asarray(row_ids) >= 0])):
            start = 0
            for fs, shard in segment.passage_files:
                with fs.open(shard, "rb") as f:
                    pf = pq.ParquetFile(f)
                    count = pf.metadata.num_rows
                    here = positions[(positions >= start) & (positions < start + count)]
                    if len(here):
                        values = pf.read(columns=[name]).column(0)
                        for p in here.tolist():
                            out[p + segment.first_row_id] = values[p - start].as_py()
                start += count
        return out

    def pages_among(self, page_ids: Collection[int]) -> list[int]:
        """Which of `page_ids` the version serves (live rows only), sorted."""
        wanted = np.fromiter(page_ids, dtype=np.int64)
        found: set[int] = set()
        for segment in self.segments:
            start = 0
            for fs, shard in segment.passage_files:
                with fs.open(shard, "rb") as f:
                    pages = pq.read_table(f, columns=["page_id"]).column(0).to_numpy()
                positions = np.flatnonzero(np.isin(pages, wanted)) + start
                live = positions[~segment.is_dropped(positions)] if len(positions) else positions
                found.update(int(p) for p in pages[live - start])
                start += len(pages)
        return sorted(found)
