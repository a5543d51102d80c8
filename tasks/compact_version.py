"""Compaction: a delta lineage of many segments becomes one or two, without re-embedding or retraining.

Every nightly and live delta adds a segment, and every segment is searched, its tombstones filtered and
its files verified and cached on every open. Compaction writes one version holding exactly the rows the
delta serves, in one of two shapes:

- **above the base** (`keep_base=True`, what a lineage past its segment budget gets): the segments the
  deltas added since the lineage's base are merged into one segment on top of the base, which is shared
  as it was. Its cost is that of the live data, not of the corpus: at 100k passages and a day of
  micro-deltas it copies a few thousand rows, where merging the base would copy all of them.
- **everything** (`keep_base=False`, a lineage past its tombstone share, and `ragindex compact`): every
  segment, the base's dead rows gone: one segment, no tombstones.

Either way the merged rows are the live rows of their segments, oldest first (tombstoned rows are gone),
renumbered (from 0, or for a merge above the base from the lineage's next row id, so no row id is ever
reused), their verified vectors copied (nothing is encoded: the encoder need not even be present), with
an index derived from the lineage base's trained quantizer (`derive_index`, never retrained). It knows what
the delta knows: the same lineage (base dump, applied days, stream position), so the nightly goes on from
the same watermark and `Content` is the same (a hold on one is a hold on the other), and the net page
changes of the versions it merged (`net_changes`), so a page they removed is not brought back by an older
revision. It goes through the one assembly path (draft -> validate -> commit) and is promoted like any
version; the segments it merged stay as long as a kept version refers to them (gc), so rolling back across
a compaction is a pointer move.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_model.lineage import lineage_manifests, open_segments
from rag_model.segments import Segment
from storage import layout
from storage.errors import Rejected
from storage.fs import file_digest
from storage.manifest import Manifest
from storage.records import EmbeddedShard, UnitRecord
from storage.store import IndexStore
from storage.timing import Steps
from tasks.assemble_version import draft_manifest, staged_build, validate_and_commit
from tasks.delta_version import net_changes, write_tombstones
from tasks.derive_index import derive_index
from tasks.embed import write_embedding_shard, write_embeddings_summary
from tasks.passage_table import write_passage_table
from tasks.passages import assemble
from tasks.reuse_index import write_hash_index
from tasks.validate import ValidationFloors

DEFAULT_MAX_SEGMENTS = 32
DEFAULT_MAX_TOMBSTONE_SHARE = 0.2
DEFAULT_MIN_TOMBSTONES = 10_000


class NothingToCompact(Rejected):
    """The version is already one segment (or, above its base, one segment on its base)."""


@dataclass(frozen=True)
class Due:
    """Why a lineage is due, and how to compact it: above its base (`keep_base`) or everything."""

    reason: str
    keep_base: bool


@dataclass(frozen=True)
class CompactionPolicy:
    """When a lineage is due: more than `max_segments` segments (then the segments above its base are merged,
    if there are two or more: the base's dead rows are few), or more than `max_tombstone_share` of the rows its
    segments hold are tombstoned (searched, then thrown away) and at least `min_tombstones` of them (then
    everything is merged: a merge costs a copy of every live row, and a few hundred dead rows are cheaper to
    filter)."""

    max_segments: int = DEFAULT_MAX_SEGMENTS
    max_tombstone_share: float = DEFAULT_MAX_TOMBSTONE_SHARE
    min_tombstones: int = DEFAULT_MIN_TOMBSTONES

    def due(self, manifest: Manifest) -> Due | None:
        """Why and how `manifest` should be compacted, or None."""
        if not manifest.is_delta:
            return None
        tombstones = manifest.counts.get("tombstones", 0)
        share = tombstones / (tombstones + manifest.live_passages) if tombstones else 0.0
        if share > self.max_tombstone_share and tombstones >= self.min_tombstones:
            return Due(f"{share:.0%} of its rows are tombstoned (budget {self.max_tombstone_share:.0%})", False)
        segments = len(manifest.segments) + 1
        if segments > self.max_segments:
            return Due(f"{segments} segments (budget {self.max_segments})", keep_base=segments > 2)
        return None


def compact_version(store: IndexStore, version_id: str, *, keep_base: bool = False,
                    floors: ValidationFloors | None = None, canaries: str | None = None, question_encoder=None,
                    shard_rows: int = layout.DEFAULT_SHARD_ROWS, progress: bool = True,
                    steps: Steps | None = None) -> Manifest:
    """Commit one version serving exactly what delta `version_id` serves (never promotes): its segments merged
    into one, or with `keep_base` those above its lineage's base merged into one on the base. Returns the ready
    compaction of that shape a run already committed (one killed before its promote) instead of another.
    `NothingToCompact` when there is nothing to merge."""
    steps = steps or Steps()
    source = store.manifest(version_id)
    if source.status != "ready":
        raise Rejected(f"version {version_id} is {source.status}: only a ready version is compacted")
    if not source.is_delta:
        raise NothingToCompact(f"version {version_id} is one segment already: nothing to compact")
    if keep_base and len(source.segments) < 2:
        raise NothingToCompact(f"version {version_id} is one segment on its base already: nothing to compact")
    done = [m for m in store.list_versions()
            if m.status == "ready" and m.compacted_from == version_id and m.is_delta == keep_base]
    if done:
        return done[-1]
    lineage = lineage_manifests(store, source)
    kept = 1 if keep_base else 0  # the base, shared as it is
    first_row_id = source.next_row_id if keep_base else 0
    new_id = store.begin_version(source.source.wiki, source.source.dump_date)
    with staged_build(store, new_id, owner=f"ragindex compact {new_id}"):
        pins = store.file_cache().pins()
        try:
            segments, tombstones = open_segments(store, source, pins, embeddings=True, passage_files=True)
            merged = segments[kept:]
            with steps("passages"):
                units = _write_live_units(store, new_id, merged)
                summary = assemble(units, store.at(new_id, layout.PASSAGES_DIR), source.source, shard_rows,
                                   first_row_id=first_row_id)
            with steps("embed"):
                _copy_live_vectors(store, new_id, merged, summary, source)
        finally:
            pins.release()
        store.fs.rm(store.version_path(new_id, layout.WORK_DIR), recursive=True)
        base_dead = tombstones[tombstones < segments[0].first_row_id + segments[0].rows] if keep_base \
            else np.empty(0, dtype=np.int64)
        with steps("build"):
            info = derive_index(store, lineage[0], store.at(new_id, layout.EMBEDDINGS_DIR),
                                store.at(new_id, layout.INDEX_FILE), progress=progress)
            write_passage_table(store.at(new_id, layout.PASSAGES_DIR), store.at(new_id, layout.PASSAGE_TABLE),
                                first_row_id=first_row_id)
            write_hash_index(store.at(new_id))
            if keep_base:
                write_tombstones(store, new_id, base_dead)
        with steps("validate"):
            counts = {"segments_merged": len(merged), "tombstones_dropped": int(len(tombstones) - len(base_dead)),
                      "encoded": 0}
            if keep_base:
                counts |= {"tombstones": int(len(base_dead)), "live_passages": source.live_passages}
            manifest = draft_manifest(
                store, new_id, index=info, timings=steps.timings, parent=version_id, counts=counts,
                segments=source.segments[:kept], first_row_id=first_row_id, lineage=source.effective_lineage,
                changes=net_changes(lineage[kept:]), compacted_from=version_id)
            manifest = manifest.model_copy(update={"precision": source.precision})
            return validate_and_commit(store, manifest, floors or ValidationFloors(), canaries=canaries,
                                       question_encoder=question_encoder)


def _write_live_units(store: IndexStore, new_id: str, segments: list[Segment]) -> list[dict]:
    """One unit file per segment in the staging area's work dir: its live rows, in row order, without
    row ids (`assemble` numbers them from 0)."""
    work = store.at(new_id, layout.WORK_DIR)
    work.fs.makedirs(work.path, exist_ok=True)
    units = []
    for ordinal, segment in enumerate(segments):
        started = time.perf_counter()
        live = _live_tables(segment)
        table = pa.concat_tables(live) if live else layout.UNIT_SCHEMA.empty_table()
        path = work.child(f"segment-{ordinal:06d}.parquet")
        with path.fs.open(path.path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        words = pc.sum(pc.list_value_length(pc.utf8_split_whitespace(table.column("text")))).as_py() or 0
        # A page's live rows are all in one segment (an edit tombstones its older rows): these add up.
        pages = pc.count_distinct(table.column("page_id")).as_py()
        units.append(UnitRecord(
            unit={"ordinal": ordinal, "url": store.version_url(segment.version), "start": None, "end": None},
            options="compaction", ordinal=ordinal, path=path.url, sha256=file_digest(path.fs, path.path),
            seen=pages, kept=pages, skipped={}, passages=table.num_rows, words=words,
            seconds=round(time.perf_counter() - started, 3),
        ).dump())
    return units


def _live_tables(segment: Segment) -> list[pa.Table]:
    """The segment's parquet shards (verified copies) without the rows its version's tombstones drop."""
    tables, position = [], 0
    keep = np.ones(segment.rows, dtype=bool)
    keep[segment.dropped] = False
    for fs, path in segment.passage_files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f).select(layout.UNIT_SCHEMA.names)
        tables.append(table.filter(pa.array(keep[position:position + table.num_rows])))
        position += table.num_rows
    if position != segment.rows:
        raise Rejected(f"segment {segment.version} holds {position} passages, its manifest counts {segment.rows}")
    return tables


def _live_vectors(segment: Segment) -> Iterator[np.ndarray]:
    """The segment's verified vectors of its live rows, shard by shard, in row order."""
    keep = np.ones(segment.rows, dtype=bool)
    keep[segment.dropped] = False
    assert segment.embeddings is not None
    for start, vectors in segment.embeddings.iter():
        yield vectors[keep[start:start + len(vectors)]]


def _copy_live_vectors(store: IndexStore, new_id: str, segments: list[Segment], summary: dict,
                       source: Manifest) -> None:
    """Write the new version's embedding shards, aligned with its passage shards, from the segments' vectors."""
    out = store.at(new_id, layout.EMBEDDINGS_DIR)
    out.fs.makedirs(out.path, exist_ok=True)
    stream = (v for segment in segments for v in _live_vectors(segment))
    pending = np.empty((0, source.encoder.dim), dtype=np.float32)
    records = []
    for shard in summary["shards"]:
        while len(pending) < shard["rows"]:
            more = next(stream, None)
            if more is None:
                raise Rejected(f"version {source.version}: its segments hold fewer vectors than live passages")
            pending = np.concatenate([pending, more])
        vectors, pending = pending[:shard["rows"]], pending[shard["rows"]:]
        record = write_embedding_shard(out.fs, out.path, shard["name"], np.ascontiguousarray(vectors),
                                       shard["sha256"], source.encoder.key, 0, source.encoder.model_id)
        records.append(EmbeddedShard(**record, seconds=0.0).dump())
    if len(pending) or any(len(more) for more in stream):  # a segment with no live rows yields an empty array
        raise Rejected(f"version {source.version}: its segments hold more vectors than live passages")
    write_embeddings_summary(out, source.encoder, records, source.question_encoder, 0.0)
