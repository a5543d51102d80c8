"""parse -> clean -> chunk, in parallel work units, assembled into the passage shards of the contract.

A work unit is a whole dump file or a byte range of its bz2 streams. Each unit writes its own
Parquet file (no row_id); `assemble` then streams the units in dump order and assigns the global
row_id, so the output is identical whatever the number of workers or units.

Every page is cleaned in a separate cleaner process with a wall-clock budget: a page that is too
large, takes too long (the cleaner is killed and restarted) or fails is skipped, counted with its
reason, and the run goes on (`tasks.cleaner`).

A little over ~400 lines: planning units, running one, and assembling them share the unit record
and its resume checks, and reading them side by side is what shows the output is worker-independent.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from storage import layout
from storage.errors import RagindexError
from storage.fs import atomic_write, file_digest, join, to_url
from storage.layout import DEFAULT_SHARD_ROWS, PASSAGE_SCHEMA, UNIT_SCHEMA
from storage.location import Location
from storage.manifest import SourceDump
from storage.records import ArticleCounts, PassagesSummary, ShardEntry, UnitRecord
from storage.scratch import scratch_dir
from storage.timing import timed
from tasks.chunk import chunk_article, content_hashes
from tasks.clean import CleanOptions, is_disambiguation, options_to_json
from tasks.cleaner import GuardedCleaner, cleaner_for
from tasks.parse import (
    DumpError,
    Page,
    file_name,
    file_size,
    index_name_for,
    is_bz2,
    is_index_file,
    iter_pages,
    scan_stream_offsets,
    starts_with_page,
    stream_offsets_from_index,
)

MIN_UNIT_BYTES = 1 << 20  # smaller units cost more in per-unit files than they gain in balance
_FLUSH_ROWS = 8192


@dataclass(frozen=True)
class WorkUnit:
    ordinal: int
    url: str
    start: int | None  # byte range of whole bz2 streams; None/None = the whole file
    end: int | None


# --- planning -------------------------------------------------------------------------------------

def plan_units(files: list[Location], workers: int, min_unit_bytes: int = MIN_UNIT_BYTES) -> list[WorkUnit]:
    """Cut the dump into about `4 * workers` units, by file and by bz2 stream offsets.

    Cut points come from the multistream index when it is among `files`, else (local files only)
    from scanning for stream headers, each checked to start with a `<page>`.
    """
    data = [f for f in files if not is_index_file(f.url)]
    if not data:
        raise DumpError("no dump data files given (only index files)")
    indexes = {file_name(f.url): f for f in files if is_index_file(f.url)}
    sizes = {f.url: file_size(f) for f in data}
    target = max(min_unit_bytes, sum(sizes.values()) // max(1, 4 * workers), 1)
    ranges: list[tuple[str, int | None, int | None]] = []
    for source in data:
        url, size = source.url, sizes[source.url]
        if not is_bz2(url) or size <= target:
            ranges.append((url, None, None))
            continue
        index = indexes.get(index_name_for(file_name(url)))
        if index:
            cuts, verify = stream_offsets_from_index(index), False
        elif source.is_local:
            cuts, verify = scan_stream_offsets(source), True
        else:
            cuts, verify = [], False  # scanning S3 would read the whole object once more
        bounds = _choose_bounds(source, [c for c in cuts if 0 < c < size], size, target, verify)
        edges = [0, *bounds, None]
        ranges.extend((url, edges[i] or None, edges[i + 1]) for i in range(len(edges) - 1))
    return [WorkUnit(i, url, start, end) for i, (url, start, end) in enumerate(ranges)]


def _choose_bounds(source: Location, cuts: list[int], size: int, target: int, verify: bool) -> list[int]:
    bounds: list[int] = []
    want = target
    for cut in cuts:
        if cut < want or size - cut < target // 4:
            continue
        if verify and not starts_with_page(source, cut):
            continue
        bounds.append(cut)
        want = cut + target
    return bounds


# --- one unit -------------------------------------------------------------------------------------

def options_key(options: CleanOptions, chunker: str = "dpr") -> str:
    """What a unit's output depends on besides its bytes; `dpr` chunking keeps the keys from before chunkers."""
    key = hashlib.sha1(options_to_json(options).encode()).hexdigest()[:16]
    return key if chunker == "dpr" else f"{key}:{chunker}"


def _skip_reason(page: Page, options: CleanOptions) -> str | None:
    if page.ns != 0:
        return "namespace"
    if page.redirect:
        return "redirect"
    if page.model != "wikitext":
        return "not_wikitext"
    if len(page.text) <= options.max_page_chars and is_disambiguation(page.title, page.text, options):
        return "disambiguation"
    return None


def _wiki_of(url: str) -> str | None:
    m = re.match(r"^([a-z][a-z0-9_]+?wiki[a-z]*)-", file_name(url))
    return m.group(1) if m else None


def run_unit(unit: WorkUnit, work_dir: Location, options: CleanOptions | None = None, chunker: str = "dpr") -> dict:
    """Parse, clean and chunk one unit into `<work_dir>/unit-NNNNNN.parquet`; return a small record.

    The record (`storage.records.UnitRecord`, as a dict) is written after the Parquet file, so its
    presence means the unit is done; a re-run with the same unit and options reuses it while the
    file still has the sha256 the record carries. The unit's file is reached through `work_dir`'s endpoint.
    """
    options = options or CleanOptions.for_wiki(_wiki_of(unit.url))
    fs, work = work_dir.fs, work_dir.path
    stem = f"unit-{unit.ordinal:06d}"
    record_path, parquet_path = join(work, stem + ".json"), join(work, stem + ".parquet")
    key = {"unit": asdict(unit), "options": options_key(options, chunker)}
    if fs.exists(record_path):
        try:
            done = UnitRecord.read(fs, record_path).dump()
        except RagindexError:
            done = None  # a torn or foreign record: redo the unit
        if done and {k: done.get(k) for k in key} == key and unit_output_intact(done, work_dir):
            return done

    timing: dict[str, float] = {}
    cleaner = cleaner_for(options)
    seen = kept = passages = words = 0
    skipped: Counter[str] = Counter()
    rows: dict[str, list] = {name: [] for name in UNIT_SCHEMA.names}
    with timed(timing, "seconds"), atomic_write(fs, parquet_path) as f:
        writer = pq.ParquetWriter(f, UNIT_SCHEMA, compression="zstd")
        try:
            pages = iter_pages(work_dir.reach(unit.url), unit.start, unit.end)
            for done_page in clean_and_chunk(pages, options, cleaner, chunker):
                seen += 1
                if done_page.reason:
                    skipped[done_page.reason] += 1
                    continue
                kept += 1
                passages += len(done_page.chunks)
                words += done_page.words
                add_rows(rows, done_page.chunks)
                if len(rows["text"]) >= _FLUSH_ROWS:
                    _flush(writer, rows)
            _flush(writer, rows)
        finally:
            writer.close()
    record = UnitRecord(
        **key, ordinal=unit.ordinal, path=to_url(fs, parquet_path), sha256=file_digest(fs, parquet_path),
        seen=seen, kept=kept,
        skipped=dict(sorted(skipped.items())), passages=passages, words=words,
        seconds=timing["seconds"],
    ).dump()
    with atomic_write(fs, record_path) as f:
        f.write(json.dumps(record).encode())
    return record


@dataclass(frozen=True)
class CleanedPage:
    """A page after cleaning and chunking: its passages, or why it has none."""

    page: Page
    chunks: list[dict]
    reason: str | None  # None: kept; else namespace / redirect / disambiguation / empty / too_large / ...
    words: int = 0


def clean_and_chunk(pages: Iterable[Page], options: CleanOptions, cleaner: GuardedCleaner,
                    chunker: str = "dpr") -> Iterator[CleanedPage]:
    """Every page of `pages`, in order, cleaned and chunked (`tasks.chunk.CHUNKERS`) as a full build does
    (the delta path uses this too, so the same text gets the same passages). Page n is cleaned while page
    n+1 is parsed."""

    def finished(page: Page, text: str | None, reason: str | None) -> CleanedPage:
        chunks = chunk_article(page.page_id, page.rev_id, page.title, text, chunker=chunker) if text else []
        if reason is None and not chunks:
            reason = "empty"
        return CleanedPage(page, [] if reason else chunks, reason, 0 if reason else len(text.split()))

    in_cleaner: Page | None = None  # sent, result not collected yet
    for page in _closing_cleaner_on_error(pages, cleaner):
        if in_cleaner is not None:  # this page was parsed while the cleaner worked
            yield finished(in_cleaner, *cleaner.result())
            in_cleaner = None
        reason = _skip_reason(page, options)
        if reason is None and not cleaner.submit(page.text):
            reason = "too_large"
        if reason:
            yield finished(page, None, reason)
        else:
            in_cleaner = page
    if in_cleaner is not None:
        yield finished(in_cleaner, *cleaner.result())


def add_rows(rows: dict[str, list], chunks: list[dict]) -> None:
    """Append chunks to column lists keyed by `UNIT_SCHEMA` names."""
    for chunk in chunks:
        for name in UNIT_SCHEMA.names:
            rows[name].append(chunk[name])


def unit_output_intact(record: dict, work_dir: Location) -> bool:
    """Whether a unit's record still describes its output: the Parquet file is inside `work_dir` with the
    sha256 the record carries. A record without one, naming a file elsewhere (a cached result may only
    point into its own work area), or whose file is gone or changed, is as good as absent."""
    try:
        done = UnitRecord.load(record, "a work unit's record")
    except RagindexError:
        return False
    output = work_dir.reach(done.path)
    if not done.sha256 or not work_dir.contains(output):
        return False
    try:
        return file_digest(output.fs, output.path) == done.sha256
    except FileNotFoundError:
        return False


def _closing_cleaner_on_error(pages, cleaner: GuardedCleaner):
    """Pages, but a failure mid-unit also stops the cleaner: its pending reply must not be read as
    the answer to the next unit's first page."""
    try:
        yield from pages
    except BaseException:
        cleaner.close()
        raise


def _flush(writer: pq.ParquetWriter, rows: dict[str, list]) -> None:
    if rows["text"]:
        writer.write_table(pa.Table.from_pydict(rows, schema=UNIT_SCHEMA))
        for column in rows.values():
            column.clear()


# --- assembling the shards ------------------------------------------------------------------------

def assemble(unit_results: list[dict], out: Location, source: SourceDump, shard_rows: int = DEFAULT_SHARD_ROWS,
             timings: dict[str, float] | None = None, first_row_id: int = 0,
             denied: Collection[int] = frozenset()) -> dict:
    """Concatenate unit outputs in ordinal order into `part-NNNNN.parquet` shards + `passages.json`.

    `passages.json` is removed first and written last, so a reader never sees a half-written set.
    `timings` may carry `parse_clean_chunk_s` (the units' wall time); then `total_s` is the whole
    passages step, units and assembly. Row ids start at `first_row_id` (a delta version's continue
    its lineage's). The passages of `denied` pages (taken down: `storage.denylist`) are left out here,
    where every build's passages get their row ids, and counted as skipped articles (`denied`).
    """
    if shard_rows <= 0:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    step_timings = dict(timings or {})
    results = sorted((UnitRecord.load(r, "a work unit's record") for r in unit_results), key=lambda r: r.ordinal)
    skipped: Counter[str] = Counter()
    for r in results:
        skipped.update(r.skipped)
    seen = sum(r.seen for r in results)
    total = sum(r.passages for r in results)
    if not total:
        names = ", ".join(sorted({file_name(r.unit["url"]) for r in results})) or "(no files)"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        raise DumpError(f"no articles in {names}: {seen} pages seen, skipped: {reasons}")

    fs, out_dir = out.fs, out.path
    summary_path = join(out_dir, layout.PASSAGES_SUMMARY)
    if fs.exists(summary_path):
        fs.rm(summary_path)
    shards: list[ShardEntry] = []
    written: list[str] = []
    left_out: set[int] = set()
    try:
        with timed(step_timings, "assemble_s"):
            for name, rows in _write_shards(out, results, shard_rows, written, first_row_id,
                                            frozenset(denied), left_out):
                shards.append(ShardEntry(name=name, rows=rows, sha256=file_digest(fs, join(out_dir, name))))
            _remove_stale_parts(fs, out_dir, keep={s.name for s in shards})
        if left_out:
            skipped["denied"] += len(left_out)
            total = sum(s.rows for s in shards)
        if "parse_clean_chunk_s" in step_timings:
            step_timings["total_s"] = round(step_timings["parse_clean_chunk_s"] + step_timings["assemble_s"], 3)
        summary = PassagesSummary(
            source=source,
            articles=ArticleCounts(seen=seen, kept=sum(r.kept for r in results) - len(left_out),
                                   skipped=dict(sorted(skipped.items()))),
            passages=total, words=sum(r.words for r in results), shards=shards, timings=step_timings,
        ).dump()
        with atomic_write(fs, summary_path) as f:
            f.write(json.dumps(summary, indent=2).encode())
    except BaseException:
        for path in written:
            if fs.exists(path):
                fs.rm(path)
        raise
    return summary


def _write_shards(out: Location, results: list[UnitRecord], shard_rows: int, written: list[str],
                  first_row_id: int = 0, denied: frozenset[int] = frozenset(), left_out: set[int] | None = None):
    """Yield (name, rows) per finished shard; global row_ids are contiguous in unit order, over the rows
    not of `denied` pages (those pages are added to `left_out`). The units' files are reached through
    `out`'s endpoint."""
    next_row = first_row_id
    shard = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def batches():
        for r in results:
            unit_file = out.reach(r.path)
            with unit_file.fs.open(unit_file.path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=_FLUSH_ROWS):
                    yield _without_denied(batch, denied, left_out) if denied else batch

    def with_row_ids(batch: pa.RecordBatch, first: int) -> pa.RecordBatch:
        # content_hash keys the reuse of vectors: recomputed here from what is embedded, never copied from a
        # unit file, so a planted file with an edited sentence cannot keep the original's hash (and vector).
        row_ids = pa.array(range(first, first + batch.num_rows), pa.int64())
        hashes = content_hashes(batch.column("title"), batch.column("text"))
        columns = [hashes if name == "content_hash" else batch.column(name) for name in UNIT_SCHEMA.names]
        return pa.RecordBatch.from_arrays([row_ids, *columns], schema=PASSAGE_SCHEMA)

    def emit(batches_: list[pa.RecordBatch]) -> tuple[str, int]:
        name = layout.passage_part(shard)
        path = join(out.path, name)
        written.append(path)
        table = pa.Table.from_batches(batches_, schema=PASSAGE_SCHEMA)
        with atomic_write(out.fs, path) as f:
            pq.write_table(table, f, compression="zstd", row_group_size=_FLUSH_ROWS)
        return name, table.num_rows

    # A shard is at most `shard_rows` rows, so holding one in memory is bounded by the caller's choice.
    for batch in batches():
        offset = 0
        while offset < batch.num_rows:
            take = min(batch.num_rows - offset, shard_rows - pending_rows)
            piece = batch.slice(offset, take)
            pending.append(with_row_ids(piece, next_row))
            next_row += take
            pending_rows += take
            offset += take
            if pending_rows == shard_rows:
                yield emit(pending)
                shard += 1
                pending, pending_rows = [], 0
    if pending_rows:
        yield emit(pending)


def _without_denied(batch: pa.RecordBatch, denied: frozenset[int], left_out: set[int] | None) -> pa.RecordBatch:
    pages = batch.column(batch.schema.get_field_index("page_id")).to_numpy()
    hit = np.isin(pages, np.fromiter(denied, dtype=np.int64))
    if not hit.any():
        return batch
    if left_out is not None:
        left_out.update(int(p) for p in np.unique(pages[hit]))
    return batch.filter(pa.array(~hit))


def _remove_stale_parts(fs, out: str, keep: set[str]) -> None:
    """Shards left by an earlier, larger run into the same directory would be mistaken for ours."""
    if not fs.exists(out):
        return
    for path in fs.ls(out, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if layout.is_passage_part(name) and name not in keep:
            fs.rm(path)


# --- everything -----------------------------------------------------------------------------------

def run_units(units: list[WorkUnit], work_dir: Location, workers: int, options: CleanOptions,
              progress: bool = True, chunker: str = "dpr") -> list[dict]:
    """Run units on a process pool (or in-process for one worker); results in ordinal order."""
    bar = tqdm(total=len(units), unit="unit", desc="passages", disable=None if progress else True)
    results: list[dict] = []

    def done(record: dict) -> None:
        results.append(record)
        bar.update(1)
        bar.set_postfix(articles=sum(r["kept"] for r in results), refresh=False)

    try:
        if workers <= 1 or len(units) <= 1:
            for unit in units:
                done(run_unit(unit, work_dir, options, chunker))
        else:
            # forkserver: safe in a threaded caller (a Prefect worker), and each worker is a fork of
            # one server that imported this module once, instead of a fresh interpreter per worker.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["tasks.passages"])
            with ProcessPoolExecutor(max_workers=min(workers, len(units)), mp_context=ctx) as pool:
                pending = {pool.submit(run_unit, u, work_dir, options, chunker) for u in units}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            done(future.result())
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
    finally:
        bar.close()
    return sorted(results, key=lambda r: r["ordinal"])


def write_passages(files: list[Location], out: Location, source: SourceDump, workers: int | None = None,
                   shard_rows: int = DEFAULT_SHARD_ROWS, progress: bool = True, options: CleanOptions | None = None,
                   min_unit_bytes: int = MIN_UNIT_BYTES, chunker: str = "dpr") -> dict:
    """Dump files -> passage shards + passages.json in `out`, cut by `chunker`; returns the passages.json dict."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if shard_rows <= 0:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    options = options or CleanOptions.for_wiki(source.wiki)
    timings: dict[str, float] = {}
    with timed(timings, "parse_clean_chunk_s"):
        units = plan_units(files, workers, min_unit_bytes)
    # Unit outputs live beside the shards locally (a crashed run resumes from them); for S3 output
    # they stay on local disk, which is cheaper than a round trip per unit.
    # A private local scratch dir reached like `out` (the units' dump files are reached through its
    # endpoint); a killed run's is removed by the next run (storage.scratch).
    work = (out.child(layout.WORK_DIR) if out.is_local
            else Location(scratch_dir("units-"), out.s3_endpoint_url))
    try:
        with timed(timings, "parse_clean_chunk_s"):
            results = run_units(units, work, workers, options, progress, chunker)
        timings["unit_s"] = round(sum(r["seconds"] for r in results), 3)  # summed over units: CPU, not wall
        summary = assemble(results, out, source, shard_rows, timings=timings)
    except BaseException:
        if not out.is_local:  # a random temp dir cannot be resumed from: do not leave it behind
            shutil.rmtree(work.path, ignore_errors=True)
        raise
    if work.fs.exists(work.path):
        work.fs.rm(work.path, recursive=True)
    return summary
