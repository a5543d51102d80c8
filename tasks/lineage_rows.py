"""The rows a version serves, read the way validation needs them: across its segments, minus tombstones.

The segments are opened by `rag_model.lineage` exactly as serving opens them (the version's own files
as its caller just checksummed them, its ancestors' checked against their manifests); this view adds
what validation does with them: sample rows, gather vectors, stream every live vector for exact
neighbours, read passage columns (content hashes, titles) of given rows, and search the lineage through
the same `SegmentSearch` serving builds, so the merge that is validated is the merge that is served.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Collection, Iterator

import numpy as np
import pyarrow.parquet as pq

from rag_model.lineage import open_segments
from rag_model.segments import Segment, SegmentSearch
from rag_model.vectors import sample_rows
from storage.manifest import Manifest
from storage.store import IndexStore

# Rows a delta's validation searches for through the whole lineage, to see the merge across segments and
# the tombstone filter answer. Each costs what a served query costs (through a flat million-row segment,
# about 40 ms on a 2-core EPYC, with or without faiss's batched path), so a fixed handful, not a sample.
LINEAGE_PROBES = 8


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

    @functools.cached_property
    def segment_search(self) -> SegmentSearch:
        """The whole lineage searched as serving searches it (built on first use: a full version's
        validation never searches more than its own segment)."""
        return SegmentSearch(self.segments)

    def own_sample(self, n: int, seed: int) -> np.ndarray:
        """n of the version's own rows, all live (a full version has no tombstones; a delta's only drop
        its ancestors' rows)."""
        return sample_rows(self.own.rows, n, seed) + self.own.first_row_id

    def lineage_probes(self, own: np.ndarray, seed: int) -> np.ndarray:
        """`LINEAGE_PROBES` row ids to search for through the whole lineage: a quarter of them from `own`,
        the rest live rows of the ancestors, drawn without listing them."""
        mine = own[:LINEAGE_PROBES // 4]
        return np.sort(np.concatenate([mine, self._ancestor_sample(LINEAGE_PROBES - len(mine), seed)]))

    def _ancestor_sample(self, n: int, seed: int) -> np.ndarray:
        """Up to n distinct live row ids below the delta's own rows, uniformly at random."""
        below = self.own.first_row_id
        found = np.empty(0, dtype=np.int64)
        rng = np.random.default_rng(seed)
        draw = n
        while len(found) < n and draw:
            draw = min(below, 4 * draw)  # tombstoned rows are rejected: draw more than needed
            ids = np.sort(rng.choice(below, size=draw, replace=False).astype(np.int64))
            live = np.zeros(len(ids), dtype=bool)
            for segment, sel, positions in self._split(ids):
                inside = positions < segment.rows
                live[sel] = inside & ~segment.is_dropped(np.minimum(positions, segment.rows - 1))
            found = ids[live]
            if draw == below:
                break
        return found[np.sort(rng.permutation(len(found))[:n])] if len(found) > n else found

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

    def blocks(self, segments: list[Segment] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(live row ids, their vectors) block by block over every segment (or those given)."""
        for segment in self.segments if segments is None else segments:
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
