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

`build_delta_version` runs the steps in the order every version is assembled (`tasks.assemble_version`):
read the days, find what the parent serves of their pages, stage, write passages and tombstones, embed,
build files, draft, validate, commit. Each runs through a `Steps` recorder, so a failure names its step;
the refresh flow hands in one that also makes each step a Prefect task (`flows.refresh_delta`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from rag_model.encoders import EncoderSpec, fingerprint_of
from rag_model.lineage import lineage_manifests, read_tombstones, served_rows
from storage import layout
from storage.cache import FileCache
from storage.errors import Rejected
from storage.fs import atomic_write
from storage.location import Location
from storage.manifest import AppliedDay, DumpFile, IndexInfo, Manifest, SourceDump
from storage.store import IndexStore
from storage.timing import Steps
from storage.verify import pin_segment, signed_manifest
from tasks import embed
from tasks.assemble_version import draft_manifest, staged_build, validate_and_commit
from tasks.delta_passages import DeltaPlan, ParentPage, newest_revisions, write_delta_passages
from tasks.derive_index import derive_index
from tasks.incr_dumps import IncrDay
from tasks.passage_table import write_passage_table
from tasks.reuse_index import write_hash_index
from tasks.validate import ValidationFloors

T = TypeVar("T")


class NothingToApply(Rejected):
    """The days hold no revision newer than the parent's: no version is made (an up-to-date night)."""


class DeltaSteps(Steps):
    """Runs each step of a delta under its name; the refresh flow's subclass makes each a Prefect task."""

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self(name):
            return fn(*args, **kwargs)


@dataclass
class _ParentRows:
    pages: dict[int, ParentPage]  # page id -> what the parent serves of it (touched pages only)
    rows: dict[int, list[int]]  # page id -> its live row ids in the parent


def build_delta_version(store: IndexStore, parent_id: str, days: Sequence[IncrDay], files: Sequence[Location], *,
                        spec: EncoderSpec, floors: ValidationFloors | None = None, canaries: str | None = None,
                        question_encoder=None, batch_size: int = 64, precision: str = "auto",
                        shard_rows: int = layout.DEFAULT_SHARD_ROWS, progress: bool = True,
                        steps: DeltaSteps | None = None) -> Manifest:
    """Apply the downloaded day `files` (one per day of `days`, md5-verified) to `parent_id`; validate and
    commit the delta version (never promotes). `NothingToApply` when the days change nothing the parent
    serves. A failure before the commit removes the staging area."""
    steps = steps or DeltaSteps()
    parent = signed_manifest(store, parent_id)  # where keys are trusted, never build on an untrusted parent
    if parent.status != "ready":
        raise Rejected(f"parent {parent_id} is {parent.status}: a delta needs a ready parent")
    if fingerprint_of(spec).key != parent.encoder.key:
        raise Rejected(f"the encoder differs from {parent_id}'s: a delta must use its lineage's encoder "
                       "(run a full build to change encoders)")
    ancestors = lineage_manifests(store, parent)  # the parent's segments, each checked, then the parent
    revisions = steps.run("parse_days", newest_revisions, list(files))
    tombstones, parent_rows = steps.run("parent_pages", _parent_rows, store, parent, set(revisions.pages))
    last = days[-1]
    version_id = store.begin_version(parent.source.wiki, last.date)
    with staged_build(store, version_id, owner=f"refresh-index:delta:{version_id}"):
        source = SourceDump(wiki=parent.source.wiki, dump_date=last.date, location=last.location,
                            files=[DumpFile(name=d.file.name, size=d.file.size) for d in days])
        plan = steps.run("passages", write_delta_passages, revisions, parent_rows.pages,
                         store.at(version_id, layout.PASSAGES_DIR), source, first_row_id=parent.next_row_id,
                         shard_rows=shard_rows)
        _check_applies(plan, days, parent_id)
        dropped = [r for page in plan.drop_page_ids for r in parent_rows.rows.get(page, [])]
        all_tombstones = np.union1d(tombstones, np.asarray(dropped, dtype=np.int64)).astype(np.int64)
        _write_tombstones(store, version_id, all_tombstones)
        steps.run("embed", _embed, store, version_id, ancestors, spec, batch_size=batch_size, precision=precision,
                  progress=progress)
        info = steps.run("build", _build_files, store, version_id, ancestors, progress=progress)

        def draft_and_validate() -> Manifest:
            lineage = parent.effective_lineage
            applied = [AppliedDay(date=d.date, maxrevid=d.maxrevid, file=d.file.name, md5=d.file.md5 or "")
                       for d in days]
            ancestors_rows = sum(m.counts.get("passages", 0) for m in ancestors)
            manifest = draft_manifest(
                store, version_id, index=info, timings=steps.timings, parent=parent_id,
                counts={"tombstones": int(len(all_tombstones)),
                        "live_passages": ancestors_rows + plan.passages - int(len(all_tombstones))},
                segments=[*parent.segments, pin_segment(store, parent)], first_row_id=parent.next_row_id,
                lineage=lineage.model_copy(update={"days": [*lineage.days, *applied]}), changes=plan.dump())
            return validate_and_commit(store, manifest, floors or ValidationFloors(), canaries=canaries,
                                       question_encoder=question_encoder)

        return steps.run("validate", draft_and_validate)


def _check_applies(plan: DeltaPlan, days: Sequence[IncrDay], parent_id: str) -> None:
    window = f"{days[0].date}..{days[-1].date}"
    if not plan.passages and not plan.drop_page_ids:
        raise NothingToApply(f"the days {window} change nothing {parent_id} serves")
    if not plan.passages:
        raise NothingToApply(f"the days {window} only remove pages; a delta without "
                             "new passages is not supported yet: they are applied with the next day")


def _parent_rows(store: IndexStore, parent: Manifest, touched: set[int]) -> tuple[np.ndarray, _ParentRows]:
    """The parent's tombstones, and what it serves of the touched pages: their newest revision and title,
    and their row ids."""
    pins = FileCache.for_store(store.url).pins()
    try:
        tombstones = read_tombstones(pins, store, parent)
    finally:
        pins.release()
    pages: dict[int, ParentPage] = {}
    rows: dict[int, list[int]] = {}
    wanted = np.fromiter(touched, dtype=np.int64)
    for table in served_rows(store, parent, ["page_id", "rev_id", "title"]):
        page_ids = table.column("page_id").to_numpy()
        row_ids = table.column("row_id").to_numpy()
        for i in np.flatnonzero(np.isin(page_ids, wanted)).tolist():
            page = int(page_ids[i])
            rows.setdefault(page, []).append(int(row_ids[i]))
            # Later segments hold later revisions of a page: the last seen is what the parent serves.
            pages[page] = ParentPage(rev_id=int(table.column("rev_id")[i].as_py()),
                                     title=table.column("title")[i].as_py())
    return tombstones, _ParentRows(pages=pages, rows=rows)


def _embed(store: IndexStore, version_id: str, ancestors: list[Manifest], spec: EncoderSpec, *, batch_size: int,
           precision: str, progress: bool) -> dict:
    """The delta's vectors, reused by content hash from its lineage (newest first) where the text is unchanged."""
    return embed.embed_passages(store.at(version_id, layout.PASSAGES_DIR), store.at(version_id, layout.EMBEDDINGS_DIR),
                                spec, reuse_from=[store.at(m.version) for m in reversed(ancestors)],
                                question_encoder=ancestors[-1].question_encoder, batch_size=batch_size,
                                precision=precision, progress=progress)


def _build_files(store: IndexStore, version_id: str, ancestors: list[Manifest], *, progress: bool) -> IndexInfo:
    """The delta's index, derived from its lineage's base, its passage table and its reuse hash table."""
    info = derive_index(store, ancestors[0], store.at(version_id, layout.EMBEDDINGS_DIR),
                        store.at(version_id, layout.INDEX_FILE), progress=progress)
    write_passage_table(store.at(version_id, layout.PASSAGES_DIR), store.at(version_id, layout.PASSAGE_TABLE),
                        first_row_id=ancestors[-1].next_row_id)
    write_hash_index(store.at(version_id))
    return info


def _write_tombstones(store: IndexStore, version_id: str, tombstones: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(tombstones, dtype=np.int64), allow_pickle=False)
    with atomic_write(store.fs, store.version_path(version_id, layout.TOMBSTONES)) as f:
        f.write(buffer.getvalue())
