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

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from rag_model.lineage import read_tombstones, served_rows
from storage import layout
from storage.denylist import denied_page_ids
from storage.errors import Rejected
from storage.fs import atomic_write
from storage.location import Location
from storage.manifest import AppliedDay, DumpFile, IndexInfo, Lineage, Manifest, SegmentRef, SourceDump
from storage.store import IndexStore
from storage.timing import Steps
from storage.verify import lineage_manifests, pin_segment, signed_manifest
from tasks.assemble_version import draft_manifest, removed_on_failure, validate_and_commit
from tasks.delta_passages import DeltaPlan, ParentPage, Revisions, newest_revisions, write_delta_passages
from tasks.derive_index import derive_index
from tasks.empty_rows import write_empty_rows
from tasks.incr_dumps import IncrDay, check_days_complete
from tasks.passage_table import write_passage_table
from tasks.progress import Progress
from tasks.reuse_index import write_hash_index
from tasks.validate import ValidationFloors

if TYPE_CHECKING:
    from rag_model.encoders import EncoderSpec

T = TypeVar("T")


class NothingToApply(Rejected):
    """The days hold no revision newer than the parent's: no version is made (an up-to-date night)."""


class DeltaSteps(Steps):
    """Runs each step of a delta under its name; the refresh flow's subclass makes each a Prefect task."""

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self(name):
            return fn(*args, **kwargs)


@dataclass
class ParentRows:
    pages: dict[int, ParentPage]  # page id -> what the parent serves of it (touched pages only)
    rows: dict[int, list[int]]  # page id -> its live row ids in the parent

    def rows_of(self, page_ids: Iterable[int]) -> np.ndarray:
        """The parent's live row ids of `page_ids`, sorted."""
        found = [r for page in page_ids for r in self.rows.get(page, [])]
        return np.unique(np.asarray(found, dtype=np.int64))


def build_delta_version(store: IndexStore, parent_id: str, days: Sequence[IncrDay], files: Sequence[Location], *,
                        spec: EncoderSpec, floors: ValidationFloors | None = None, canaries: str | None = None,
                        question_encoder=None, batch_size: int = 64, precision: str = "auto",
                        shard_rows: int = layout.DEFAULT_SHARD_ROWS, progress: bool = True,
                        on_progress: Callable[[Progress], None] | None = None, progress_every_s: float = 10.0,
                        steps: DeltaSteps | None = None, record_unchanged: bool = False) -> Manifest:
    """Apply the downloaded day `files` (one per day of `days`, md5-verified) to `parent_id`; validate and
    commit the delta version (never promotes). `NothingToApply` when the days change nothing the parent
    serves, unless `record_unchanged`: then a delta with no change of its own records that the parent now
    knows those days (a full build that already kept the lineage's newer revisions, caught up). A failure
    before the commit removes the staging area. `on_progress`: see `embed.embed_shard`."""
    steps = steps or DeltaSteps()
    parent, ancestors = checked_parent(store, parent_id, spec)
    revisions = steps.run("parse_days", _parse_days, days, files)
    last = days[-1]
    source = SourceDump(wiki=parent.source.wiki, dump_date=last.date, location=last.location,
                        files=[DumpFile(name=d.file.name, size=d.file.size) for d in days])
    lineage = parent.effective_lineage
    applied = [AppliedDay(date=d.date, maxrevid=d.maxrevid, file=d.file.name, md5=d.file.md5 or "") for d in days]
    return apply_revisions(store, parent, ancestors, revisions, source,
                           lineage.model_copy(update={"days": [*lineage.days, *applied]}),
                           window=f"the days {days[0].date}..{days[-1].date}", spec=spec, floors=floors,
                           canaries=canaries, question_encoder=question_encoder, batch_size=batch_size,
                           precision=precision, shard_rows=shard_rows, progress=progress, on_progress=on_progress,
                           progress_every_s=progress_every_s, steps=steps, record_unchanged=record_unchanged)


def _parse_days(days: Sequence[IncrDay], files: Sequence[Location]) -> Revisions:
    """The newest revision of every page the days touch; `PartialDay` when a file falls short of its maxrevid."""
    revisions = newest_revisions(list(files))
    check_days_complete(days, revisions.highest)
    return revisions


def checked_parent(store: IndexStore, parent_id: str, spec: EncoderSpec) -> tuple[Manifest, list[Manifest]]:
    """The parent (ready, same encoder) and its lineage's manifests, each checked, the parent last."""
    from rag_model.encoders import fingerprint_of  # torch: not imported by a takedown, which never encodes

    parent = signed_manifest(store, parent_id)  # where keys are trusted, never build on an untrusted parent
    if parent.status != "ready":
        raise Rejected(f"parent {parent_id} is {parent.status}: a delta needs a ready parent")
    fingerprint = fingerprint_of(spec)
    if fingerprint.chunker != parent.encoder.chunker:
        raise Rejected(f"the chunker differs from {parent_id}'s ({fingerprint.chunker}, not {parent.encoder.chunker}): "
                       f"a delta must chunk like its lineage (set RAGINDEX_CHUNKER={parent.encoder.chunker}, or run "
                       "a full build to change chunkers)")
    if fingerprint.key != parent.encoder.key:
        raise Rejected(f"the encoder differs from {parent_id}'s: a delta must use its lineage's encoder "
                       "(run a full build to change encoders)")
    return parent, lineage_manifests(store, parent)


def apply_revisions(store: IndexStore, parent: Manifest, ancestors: list[Manifest], revisions: Revisions,
                    source: SourceDump, lineage: Lineage, *, window: str, spec: EncoderSpec,
                    floors: ValidationFloors | None = None, canaries: str | None = None, question_encoder=None,
                    batch_size: int = 64, precision: str = "auto", shard_rows: int = layout.DEFAULT_SHARD_ROWS,
                    progress: bool = True, on_progress: Callable[[Progress], None] | None = None,
                    progress_every_s: float = 10.0, steps: DeltaSteps | None = None,
                    record_unchanged: bool = False) -> Manifest:
    """The delta of `revisions` (pages' newest revisions, and pages removed) on `parent`, whatever read them
    (adds-changes days, or the live streams): passages, tombstones, embed, build, validate, commit.
    `lineage` is the new version's (what it knows). `NothingToApply` when nothing the parent serves changes.
    Pages taken down (`storage.denylist`) gain nothing, and the parent's rows of them are dropped."""
    steps = steps or DeltaSteps()
    denied = denied_page_ids(store, parent.source.wiki)
    # The parent's rows of denied pages are looked up too: a parent from before a takedown (rolled back
    # to) may still serve one, and this delta must not.
    touched = set(revisions.pages) | set(revisions.removed) | denied
    tombstones, held = steps.run("parent_pages", parent_rows, store, parent, touched, ancestors)
    build_key = delta_build_key(pin_segment(store, parent), lineage, parent.encoder.key, shard_rows, denied)
    with store.build_lock(owner=f"refresh-index:delta:{build_key[:12]}"):
        # Under the lock: a killed run's staging version is resumed by one run only.
        version_id, _ = store.resume_or_begin(parent.source.wiki, source.dump_date, build_key)
        with removed_on_failure(store, version_id):
            plan = steps.run("passages", write_delta_passages, revisions, held.pages,
                             store.at(version_id, layout.PASSAGES_DIR), source, first_row_id=parent.next_row_id,
                             shard_rows=shard_rows, denied=denied, chunker=parent.encoder.chunker)
            if not record_unchanged:
                _check_applies(plan, window, parent.version)
            if plan.passages:
                steps.run("embed", _embed, store, version_id, ancestors, spec, batch_size=batch_size,
                          precision=precision, progress=progress, on_progress=on_progress,
                          progress_every_s=progress_every_s)
            else:  # only removals: a delta with no rows of its own
                write_empty_rows(store, version_id, parent, source, plan.skipped)
            return publish_delta(
                store, version_id, parent, ancestors, np.union1d(tombstones, held.rows_of(plan.drop_page_ids)),
                new_rows=plan.passages, lineage=lineage, changes=plan.dump(), steps=steps, floors=floors,
                canaries=canaries, question_encoder=question_encoder, progress=progress)


def delta_build_key(parent: SegmentRef, lineage: Lineage, encoder_key: str, shard_rows: int,
                    denied: Iterable[int] = ()) -> str:
    """What a delta is built from: its parent (pinned by its manifest's sha256), what it will know (the
    lineage's days by date and maxrevid, or stream position), the encoder, the shard size and the pages taken
    down. A re-run of a killed delta with the same key resumes its staging version: the same id, the passages
    written again to the same bytes, the vectors already embedded kept."""
    blob = json.dumps({"kind": "delta", "parent": parent.version, "parent_manifest": parent.manifest_sha256,
                       "content": lineage.content.model_dump(mode="json"), "encoder": encoder_key,
                       "shard_rows": shard_rows, "denied": sorted(int(p) for p in denied)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def publish_delta(store: IndexStore, version_id: str, parent: Manifest, ancestors: list[Manifest],
                  tombstones: np.ndarray, *, new_rows: int, lineage: Lineage, changes: dict[str, Any],
                  steps: DeltaSteps, floors: ValidationFloors | None = None, canaries: str | None = None,
                  question_encoder=None, progress: bool = False, kind: str | None = None,
                  allow_count_change: bool = False) -> Manifest:
    """The last steps of a staged delta whose own passages and vectors are written: its tombstones (every
    ancestor row it no longer serves), its index, passage table and reuse hash table, then draft,
    validate, commit. A takedown version (`tasks.takedown`) comes here too, with no rows of its own."""
    tombstones = np.asarray(tombstones, dtype=np.int64)
    write_tombstones(store, version_id, tombstones)
    info = steps.run("build", _build_files, store, version_id, ancestors, progress=progress)

    def draft_and_validate() -> Manifest:
        ancestors_rows = sum(m.counts.get("passages", 0) for m in ancestors)
        manifest = draft_manifest(
            store, version_id, index=info, timings=steps.timings, parent=parent.version,
            counts={"tombstones": int(len(tombstones)),
                    "live_passages": ancestors_rows + new_rows - int(len(tombstones))},
            segments=[*parent.segments, pin_segment(store, parent)], first_row_id=parent.next_row_id,
            lineage=lineage, changes=changes, kind=kind)
        gate = floors or ValidationFloors()
        if allow_count_change:
            gate = dataclasses.replace(gate, allow_count_change=True)
        return validate_and_commit(store, manifest, gate, canaries=canaries, question_encoder=question_encoder)

    return steps.run("validate", draft_and_validate)


def _check_applies(plan: DeltaPlan, window: str, parent_id: str) -> None:
    if not plan.passages and not plan.drop_page_ids:
        raise NothingToApply(f"{window} change nothing {parent_id} serves")


def parent_rows(store: IndexStore, parent: Manifest, touched: set[int],
                ancestors: list[Manifest] | None = None) -> tuple[np.ndarray, ParentRows]:
    """The parent's tombstones, and what it serves of the touched pages: their newest revision and title,
    and their row ids; a touched page the lineage (`ancestors`, default the parent's) removed and serves no
    more is listed as removed at the revision it was removed at."""
    pins = store.file_cache().pins()
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
    for page, (rev_id, title) in lineage_removals(ancestors or lineage_manifests(store, parent)).items():
        if page in touched and page not in pages:
            pages[page] = ParentPage(rev_id=rev_id, title=title, removed=True)
    return tombstones, ParentRows(pages=pages, rows=rows)


def lineage_removals(manifests: Sequence[Manifest]) -> dict[int, tuple[int, str]]:
    """page id -> (revision id, title) of every page the lineage (`manifests`, oldest first) removed and did
    not serve again: what must not come back with an older revision."""
    removed: dict[int, tuple[int, str]] = {}
    for manifest in manifests:
        changes = manifest.changes or {}
        for page_id, *_ in [*changes.get("added", []), *changes.get("changed", []), *changes.get("moved", [])]:
            removed.pop(int(page_id), None)
        for page_id, rev_id, title in changes.get("removed", []):
            removed[int(page_id)] = (int(rev_id), str(title))
    return removed


def net_changes(manifests: Sequence[Manifest]) -> dict[str, list[list[Any]]]:
    """What `manifests` (oldest first) did to each page, as one version's `changes`: only each page's last
    add/change/move (`added`, [page_id, title]) or removal (`removed`, [page_id, rev_id, title]). A compaction
    records it for the versions it merges, so `lineage_removals` over a compacted lineage answers as over the
    versions it merged: a page they removed stays removed, one they brought back stays served."""
    last: dict[int, tuple[str, list[Any]]] = {}
    for manifest in manifests:  # the order `lineage_removals` reads them in
        changes = manifest.changes or {}
        for page_id, *rest in [*changes.get("added", []), *changes.get("changed", []), *changes.get("moved", [])]:
            last[int(page_id)] = ("added", [int(page_id), rest[-1] if rest else ""])
        for page_id, rev_id, title in changes.get("removed", []):
            last[int(page_id)] = ("removed", [int(page_id), int(rev_id), str(title)])
    net: dict[str, list[list[Any]]] = {"added": [], "removed": []}
    for page_id in sorted(last):
        kind, entry = last[page_id]
        net[kind].append(entry)
    return net


def _embed(store: IndexStore, version_id: str, ancestors: list[Manifest], spec: EncoderSpec, *, batch_size: int,
           precision: str, progress: bool, on_progress: Callable[[Progress], None] | None,
           progress_every_s: float) -> dict:
    """The delta's vectors, reused by content hash from its lineage (newest first) where the text is unchanged."""
    from tasks import embed
    return embed.embed_passages(store.at(version_id, layout.PASSAGES_DIR), store.at(version_id, layout.EMBEDDINGS_DIR),
                                spec, reuse_from=[store.at(m.version) for m in reversed(ancestors)],
                                question_encoder=ancestors[-1].question_encoder, batch_size=batch_size,
                                precision=precision, progress=progress, on_progress=on_progress,
                                progress_every_s=progress_every_s)


def _build_files(store: IndexStore, version_id: str, ancestors: list[Manifest], *, progress: bool) -> IndexInfo:
    """The delta's index, derived from its lineage's base, its passage table and its reuse hash table."""
    info = derive_index(store, ancestors[0], store.at(version_id, layout.EMBEDDINGS_DIR),
                        store.at(version_id, layout.INDEX_FILE), progress=progress)
    write_passage_table(store.at(version_id, layout.PASSAGES_DIR), store.at(version_id, layout.PASSAGE_TABLE),
                        first_row_id=ancestors[-1].next_row_id)
    write_hash_index(store.at(version_id))
    return info


def write_tombstones(store: IndexStore, version_id: str, tombstones: np.ndarray) -> None:
    """A staged delta's tombstones.npy: every ancestor row id it no longer serves, sorted."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(tombstones, dtype=np.int64), allow_pickle=False)
    with atomic_write(store.fs, store.version_path(version_id, layout.TOMBSTONES)) as f:
        f.write(buffer.getvalue())
