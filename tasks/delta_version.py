"""A delta version: a parent version plus Wikipedia's adds-changes days, written at the cost of the change.

The delta's own directory holds only what the days changed: the passages of new, edited and moved
pages (row ids continuing the lineage's), their vectors (reused by content hash where the text did
not change), an index over them derived from the base's (`tasks.derive_index`), its passage table
and reuse hash table, and `tombstones.npy` (every ancestor row the lineage no longer serves). The
rows of the parent's lineage are shared, not copied: the manifest lists them as segments, each
pinned by its manifest's sha256. It is validated like any version and promoted, served and rolled
back like one.

Per page id the newest revision across the days wins, and only if it is newer than what the parent
holds, so overlapping or repeated windows are harmless. Pages are cleaned and chunked by the code a
full build uses (`tasks.delta_passages`), so the same text gets the same passage ids and hashes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rag_model.encoders import EncoderSpec, fingerprint_of
from storage import layout
from storage.errors import Rejected
from storage.fs import atomic_write
from storage.manifest import AppliedDay, DumpFile, Lineage, Manifest, SegmentRef, SourceDump
from storage.store import IndexStore
from storage.timing import timed
from storage.verify import segment_manifests
from tasks import embed
from tasks.assemble_version import staged_build
from tasks.delta_passages import ParentPage, newest_revisions, write_delta_passages
from tasks.derive_index import derive_index
from tasks.incr_dumps import IncrDay
from tasks.lineage_rows import LineageRows, passage_columns
from tasks.passage_table import write_passage_table
from tasks.reuse_index import write_hash_index
from tasks.validate import ValidationFloors, draft_manifest, finalize_version


class NothingToApply(Rejected):
    """The days hold no revision newer than the parent's: no version is made."""


@dataclass
class _ParentRows:
    pages: dict[int, ParentPage]  # page id -> what the parent serves of it (touched pages only)
    rows: dict[int, list[int]]  # page id -> its live row ids in the parent


def build_delta_version(store: IndexStore, parent_id: str, days: Sequence[IncrDay], files: Sequence[str], *,
                        spec: EncoderSpec, floors: ValidationFloors | None = None, canaries: str | None = None,
                        question_encoder=None, batch_size: int = 64, precision: str = "auto",
                        shard_rows: int = 100_000, progress: bool = True) -> Manifest:
    """Apply the downloaded day `files` (one per day of `days`, md5-verified) to `parent_id`; validate and
    commit the delta version (never promotes). A failure before the commit removes the staging area."""
    parent = store.manifest(parent_id)
    if parent.status != "ready":
        raise Rejected(f"parent {parent_id} is {parent.status}: a delta needs a ready parent")
    if fingerprint_of(spec).key != parent.encoder.key:
        raise Rejected(f"the encoder differs from {parent_id}'s: a delta must use its lineage's encoder "
                       "(run a full build to change encoders)")
    ancestors = [*segment_manifests(store, parent), parent]
    timings: dict[str, float] = {}
    with timed(timings, "parse_days_s"):
        revisions = newest_revisions(list(files), store.s3_endpoint_url)
    with timed(timings, "parent_pages_s"):
        tombstones = LineageRows.tombstones_of(store, parent)
        parent_rows = _parent_rows(store, ancestors, set(revisions.pages), tombstones)
    last = days[-1]
    version_id = store.begin_version(parent.source.wiki, last.date)
    with staged_build(store, version_id, owner=f"refresh-index:delta:{version_id}"):
        with timed(timings, "passages_s"):
            source = SourceDump(wiki=parent.source.wiki, dump_date=last.date, location=last.location,
                                files=[DumpFile(name=d.file.name, size=d.file.size) for d in days])
            plan = write_delta_passages(revisions, parent_rows.pages,
                                        store.version_url(version_id, layout.PASSAGES_DIR), source,
                                        first_row_id=parent.next_row_id, s3_endpoint_url=store.s3_endpoint_url,
                                        shard_rows=shard_rows)
        if not plan.passages and not plan.drop_page_ids:
            raise NothingToApply(f"the days {days[0].date}..{last.date} change nothing {parent_id} serves")
        if not plan.passages:
            raise NothingToApply(f"the days {days[0].date}..{last.date} only remove pages; a delta without "
                                 "new passages is not supported yet: they are applied with the next day")
        dropped = [r for page in plan.drop_page_ids for r in parent_rows.rows.get(page, [])]
        all_tombstones = np.union1d(tombstones, np.asarray(dropped, dtype=np.int64)).astype(np.int64)
        _write_tombstones(store, version_id, all_tombstones)
        with timed(timings, "embed_s"):
            embeddings_url = store.version_url(version_id, layout.EMBEDDINGS_DIR)
            embed.embed_passages(store.version_url(version_id, layout.PASSAGES_DIR), embeddings_url, spec,
                                 reuse_from=[store.version_url(m.version) for m in reversed(ancestors)],
                                 question_encoder=parent.question_encoder, batch_size=batch_size,
                                 precision=precision, s3_endpoint_url=store.s3_endpoint_url, progress=progress)
        with timed(timings, "build_s"):
            info = derive_index(store, ancestors[0], embeddings_url,
                                store.version_url(version_id, layout.INDEX_FILE), progress=progress)
            write_passage_table(store.version_url(version_id, layout.PASSAGES_DIR),
                                store.version_url(version_id, layout.PASSAGE_TABLE), store.s3_endpoint_url,
                                first_row_id=parent.next_row_id)
            write_hash_index(store.version_url(version_id), store.s3_endpoint_url)
        manifest = draft_manifest(store, version_id, index=info, timings=timings, parent=parent_id)
        base = parent.lineage or Lineage(base_version=parent.version, base_dump=parent.source.dump_date)
        applied = [AppliedDay(date=d.date, maxrevid=d.maxrevid, file=d.file.name, md5=d.file.md5 or "")
                   for d in days]
        manifest = manifest.model_copy(update={
            "segments": [_segment_ref(store, m) for m in ancestors],
            "first_row_id": parent.next_row_id,
            "lineage": base.model_copy(update={"days": [*base.days, *applied]}),
            "counts": {**manifest.counts, "tombstones": int(len(all_tombstones)),
                       "live_passages": sum(m.counts.get("passages", 0) for m in ancestors)
                       + plan.passages - int(len(all_tombstones))},
            "changes": plan.dump(),
        })
        manifest = finalize_version(store, manifest, floors or ValidationFloors(), canaries=canaries,
                                    question_encoder=question_encoder)
    return manifest


def _segment_ref(store: IndexStore, m: Manifest) -> SegmentRef:
    data = store.manifest_bytes(m.version)
    return SegmentRef(version=m.version, manifest_sha256=hashlib.sha256(data).hexdigest(),
                      first_row_id=m.first_row_id, rows=m.counts.get("passages", 0))


def _parent_rows(store: IndexStore, ancestors: list[Manifest], touched: set[int],
                 tombstones: np.ndarray) -> _ParentRows:
    """What the parent serves of the touched pages: their newest revision and title, and their row ids."""
    pages: dict[int, ParentPage] = {}
    rows: dict[int, list[int]] = {}
    wanted = np.fromiter(touched, dtype=np.int64)
    for _, table in passage_columns(store, ancestors, ["row_id", "page_id", "rev_id", "title"]):
        page_ids = table.column("page_id").to_numpy()
        row_ids = table.column("row_id").to_numpy()
        keep = np.isin(page_ids, wanted) & ~np.isin(row_ids, tombstones)
        for i in np.flatnonzero(keep).tolist():
            page = int(page_ids[i])
            rows.setdefault(page, []).append(int(row_ids[i]))
            # Later segments hold later revisions of a page: the last seen is what the parent serves.
            pages[page] = ParentPage(rev_id=int(table.column("rev_id")[i].as_py()),
                                     title=table.column("title")[i].as_py())
    return _ParentRows(pages=pages, rows=rows)


def _write_tombstones(store: IndexStore, version_id: str, tombstones: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(tombstones, dtype=np.int64), allow_pickle=False)
    with atomic_write(store.fs, store.version_path(version_id, layout.TOMBSTONES)) as f:
        f.write(buffer.getvalue())
