"""Assemble a version from its staged passages/ and embeddings/, in one verb order for every kind of
version: stage -> build files -> draft the manifest -> validate -> commit.

`build_version_files` (a full version's index, passage table and reuse hash table), `draft_manifest`
and `validate_and_commit` are the one assembly path: `ragindex build` (`build_version`, which first
copies the given directories into a staging version), the refresh flow (`finish_version`) and a
delta version (`tasks.delta_version`, which derives its index instead) all go through them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from rag_model.lineage import served_page_ids
from rag_model.vectors import open_embeddings
from storage import layout
from storage.errors import RagindexError
from storage.fs import atomic_write, join, remove_inside
from storage.location import Location
from storage.manifest import IndexInfo, Lineage, Manifest, SegmentRef
from storage.names import check_file_name
from storage.records import PassagesSummary
from storage.timing import timed
from tasks.build_index import build_index
from tasks.index_spec import DEFAULT_MEMORY_BUDGET
from tasks.passage_table import write_passage_table
from tasks.reuse_index import write_hash_index
from tasks.validate import ValidationFloors, read_summaries, validate_version


def copy_tree(src: Location, dst: Location, progress: bool = True) -> None:
    """Copy the files of a directory into the store (each whole or not at all)."""
    src_fs, src_dir, dst_fs, dst_dir = src.fs, src.path, dst.fs, dst.path
    try:
        files = sorted(p.rstrip("/") for p in src_fs.ls(src_dir, detail=False))
    except FileNotFoundError:
        raise RagindexError(f"no directory at {src}") from None
    files = [p for p in files if src_fs.isfile(p)]
    for p in tqdm(files, desc=f"copying {os.path.basename(src_dir)}", unit="file", disable=None if progress else True):
        name = check_file_name(p.rsplit("/", 1)[-1])
        with src_fs.open(p, "rb") as src, atomic_write(dst_fs, join(dst_dir, name)) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


def build_version_files(store, version_id: str, *, spec: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                        target_recall: float = 0.95, progress: bool = True,
                        timings: dict[str, float] | None = None) -> IndexInfo:
    """Build index.faiss, passages.arrow and the reuse hash table of a staged version from its
    passages/ and embeddings/.

    They are independent (faiss, Arrow and numpy release the GIL), so the two tables are written
    beside the index build, one after the other on one thread.
    """
    timings = {} if timings is None else timings
    at = store.at
    with ThreadPoolExecutor(max_workers=1) as pool, timed(timings, "build_s"):
        table = pool.submit(write_passage_table, at(version_id, layout.PASSAGES_DIR),
                            at(version_id, layout.PASSAGE_TABLE))
        hash_index = pool.submit(write_hash_index, at(version_id))
        with timed(timings, "index_s"):
            info = build_index(at(version_id, layout.EMBEDDINGS_DIR), at(version_id, layout.INDEX_FILE),
                               spec=spec, memory_budget=memory_budget, target_recall=target_recall,
                               progress=progress, trained=store.location.child(layout.TRAINED_DIR))
        table.result()
        hash_index.result()
    return info


def draft_manifest(store, version_id: str, *, index: IndexInfo, timings: dict[str, float], parent: str | None,
                   counts: dict[str, int] | None = None, segments: list[SegmentRef] | None = None,
                   first_row_id: int = 0, lineage: Lineage | None = None,
                   changes: dict[str, Any] | None = None, kind: str | None = None,
                   compacted_from: str | None = None) -> Manifest:
    """The manifest of a staged version before validation (status provisionally `rejected`), from its
    own summaries; a delta also names its segments, first row id, lineage and changes (and `kind`: a
    takedown's), a compaction the delta it compacts and its lineage.

    `counts` add to (or override) the summaries' counts. Timings are `<step>_s`: the summaries' own (the
    passages summary's `total_s`, its whole step, becomes `passages_s`), overridden by the caller's for
    the same step.
    """
    passages, embeddings = read_summaries(store, version_id)
    summary_counts = {
        "passages": passages.passages,
        "embeddings": embeddings.rows,
        "articles_seen": passages.articles.seen,
        "articles_kept": passages.articles.kept,
        "words": passages.words,
        "encoded": embeddings.encoded,
        "reused": embeddings.reused,
    }
    passage_timings = {("passages_s" if k == "total_s" else k): v for k, v in passages.timings.items()}
    return Manifest(
        version=version_id,
        status="rejected",
        parent=parent,
        source=passages.source,
        encoder=embeddings.fingerprint,
        question_encoder=embeddings.question_encoder,
        precision=embeddings.precision,
        index=index,
        counts={**summary_counts, **(counts or {})},
        skipped=dict(passages.articles.skipped),
        timings={**passage_timings, **embeddings.timings, **timings},
        segments=segments or [],
        first_row_id=first_row_id,
        lineage=lineage,
        changes=changes or {},
        compacted_from=compacted_from,
        kind=kind,
    )


def validate_and_commit(store, manifest: Manifest, floors: ValidationFloors, *, canaries: str | None = None,
                        question_encoder=None) -> Manifest:
    """Checksum every file of the staged version, validate it, set its status and commit its manifest (last).

    Canaries are asked through `question_encoder`, else the one the manifest pairs with its encoder."""
    files = store.checksums(manifest.version)
    index_path = store.version_path(manifest.version, layout.INDEX_FILE)
    index_info = manifest.index.model_copy(
        update={"bytes": store.fs.size(index_path) if store.fs.exists(index_path) else 0}
    )
    manifest = manifest.model_copy(update={"files": files, "index": index_info})
    timings = dict(manifest.timings)
    with timed(timings, "validate_s"):
        validation = validate_version(store, manifest, floors, canaries=canaries,
                                      question_encoder=question_encoder, verified_files=files)
    manifest = manifest.model_copy(update={
        "validation": validation, "status": "ready" if validation.passed else "rejected", "timings": timings,
    })
    store.commit_version(manifest)
    return manifest


def finish_version(store, version_id: str, index: IndexInfo, floors: ValidationFloors, *,
                   timings: dict[str, float] | None = None, canaries: str | None = None,
                   question_encoder=None) -> Manifest:
    """A full version's last steps: draft its manifest (counting the deletions it reconciles), validate, commit."""
    parent = store.latest_ready()
    reconciled = reconciled_deletions(store, version_id)
    manifest = draft_manifest(store, version_id, index=index, timings=timings or {},
                              parent=parent.version if parent else None,
                              counts=None if reconciled is None else {"deletions_reconciled": reconciled})
    return validate_and_commit(store, manifest, floors, canaries=canaries, question_encoder=question_encoder)


def reconciled_deletions(store, version_id: str) -> int | None:
    """Pages CURRENT's delta lineage serves that the full build staged as `version_id` no longer has: the
    deletions adds-changes days cannot show, counted when a full dump reconciles them (None unless
    CURRENT is a delta of the same wiki, and the dump is not older than its newest day: the pages an older
    dump lacks are pages it predates, not deletions)."""
    pointer = store.current()
    current = store.manifest(pointer.version) if pointer else None
    source = read_summaries(store, version_id)[0].source
    if current is None or current.lineage is None or current.source.wiki != source.wiki \
            or source.dump_date < current.effective_lineage.watermark:
        return None
    fresh = [np.empty(0, dtype=np.int64)]
    for shard in layout.passage_shard_paths(store.fs, store.version_path(version_id, layout.PASSAGES_DIR)):
        with store.fs.open(shard, "rb") as f:  # this build's own shards, just written
            fresh.append(pq.read_table(f, columns=["page_id"]).column(0).to_numpy())
    return int(len(np.setdiff1d(served_page_ids(store, current), np.concatenate(fresh))))


@contextlib.contextmanager
def staged_build(store, version_id: str, owner: str, exclusive: bool = True) -> Iterator[None]:
    """Build a staged version under the store's build lock; a failure before its commit removes the
    staging area (a kill leaves it to gc).

    Not `exclusive`: without the lock. A takedown must not wait hours for a full build to finish; it
    writes only its own staging area and is promoted by compare-and-swap, like any version."""
    with removed_on_failure(store, version_id), \
            store.build_lock(owner=owner) if exclusive else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def removed_on_failure(store, version_id: str) -> Iterator[None]:
    """A failure before the staged version's commit removes its staging area; a kill leaves it (to be
    resumed, or to gc)."""
    try:
        yield
    except BaseException:
        if not store.has_version(version_id):
            remove_inside(store.fs, store.root, store.version_path(version_id))  # never through a link
        raise


def build_version(store, passages: Location, embeddings: Location, *, spec: str = "auto",
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, floors=None, canaries: str | None = None,
                  question_encoder: str | None = None, progress: bool = True, target_recall: float = 0.95):
    """`ragindex build`: stage a version from passage + embedding dirs, build, validate, commit.

    Never promotes. A failure before the commit removes the staging area (a kill leaves it to gc).
    """
    source = PassagesSummary.read(passages.fs, join(passages.path, layout.PASSAGES_SUMMARY)).source
    # Fail on bad input before staging anything.
    fingerprint = open_embeddings(embeddings).fingerprint
    version_id = store.begin_version(source.wiki, source.dump_date)
    with staged_build(store, version_id, owner=f"ragindex build {version_id}"):
        timings: dict[str, float] = {}
        with timed(timings, "copy_s"):
            for sub, src in ((layout.PASSAGES_DIR, passages), (layout.EMBEDDINGS_DIR, embeddings)):
                if src.url.rstrip("/") != store.version_url(version_id, sub):
                    copy_tree(src, store.at(version_id, sub), progress)
        info = build_version_files(store, version_id, spec=spec, memory_budget=memory_budget,
                                   target_recall=target_recall, progress=progress, timings=timings)
        asked = None
        if question_encoder and canaries:
            from rag_model.encoders import question_encoder_for

            asked = question_encoder_for(fingerprint, question_encoder)
        return finish_version(store, version_id, info, floors or ValidationFloors(), timings=timings,
                              canaries=canaries, question_encoder=asked)
