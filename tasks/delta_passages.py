"""What adds-changes days do to a parent version's pages, and the passages of the pages they change.

A day's `pages-meta-hist-incr.xml.bz2` holds every new revision of its window, in all namespaces.
Per page id the newest revision across all the days given wins (`newest_revisions`); it is applied
only if its id is above the revision the parent serves, so overlapping windows change nothing.

`write_delta_passages` then classifies each winning page against the parent:
- added: the parent serves no passages of it and it now has some;
- changed: same title, new text; moved: new title (the title is part of what is embedded);
- redirected / emptied: it now has no passages (a redirect, a disambiguation page, no text left,
  or moved out of the main namespace): the parent's rows of it are dropped and nothing replaces them;
- removed (the live path, `Revisions.removed`): deleted, moved out of the main namespace, or its text
  hidden: the parent's rows of it are dropped. Each is recorded with its revision id, so a later delta
  (or full build) does not bring back a revision the lineage has seen deleted (`ParentPage.removed`).
Pages are cleaned and chunked by `tasks.passages.clean_and_chunk`, the code a full build runs, so
the same text gives the same passage ids and content hashes (and its vector is reused, not encoded).
Its scratch (the one unit file) is written in the staging version's `_work/`, never the system temp
directory: a killed run leaves it in its own staging area, which the re-run resumes (or gc removes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from storage.fs import atomic_write, file_digest, join, to_url
from storage.layout import DEFAULT_SHARD_ROWS, UNIT_SCHEMA, WORK_DIR
from storage.location import Location
from storage.manifest import SourceDump
from storage.records import UnitRecord
from tasks.clean import CleanOptions
from tasks.cleaner import cleaner_for
from tasks.parse import Page, iter_pages
from tasks.passages import add_rows, assemble, clean_and_chunk, options_key


@dataclass(frozen=True)
class ParentPage:
    """What the parent version serves of a page: the revision its passages came from, and their title."""

    rev_id: int
    title: str
    removed: bool = False  # the lineage removed the page at `rev_id` (and serves none of it)


@dataclass(frozen=True)
class Removal:
    """A page that is gone at `rev_id`: it is dropped where the parent serves that revision or an older one
    (`exact`: only that very revision, as for a hidden revision's text)."""

    rev_id: int
    reason: str
    exact: bool = False


@dataclass
class Revisions:
    pages: dict[int, Page]  # page id -> its newest revision across the days (text dropped outside ns 0)
    revisions_seen: int = 0  # <revision> elements read, all namespaces
    removed: dict[int, Removal] = field(default_factory=dict)  # page id -> why it is gone (live path)
    highest: list[int] = field(default_factory=list)  # per file, in order: the highest revision id it holds


@dataclass
class DeltaPlan:
    """What applying the days does; `drop_page_ids` are the parent pages whose rows the delta tombstones."""

    passages: int = 0
    drop_page_ids: list[int] = field(default_factory=list)
    added: list[list[Any]] = field(default_factory=list)  # [page_id, title]
    changed: list[list[Any]] = field(default_factory=list)
    moved: list[list[Any]] = field(default_factory=list)  # [page_id, "old title → new title"]
    redirected: list[list[Any]] = field(default_factory=list)
    emptied: list[list[Any]] = field(default_factory=list)  # [page_id, "title (reason)"]
    removed: list[list[Any]] = field(default_factory=list)  # [page_id, rev_id, "title (reason)"]
    taken_down: list[list[Any]] = field(default_factory=list)  # [page_id, title]: denied pages the parent served
    denied: int = 0  # revisions of denied pages (storage.denylist) left out
    stale: int = 0  # revisions not newer than what the parent serves
    ignored_namespace: int = 0  # pages outside the main namespace the parent never served
    skipped: dict[str, int] = field(default_factory=dict)  # new pages with no passages, by reason
    revisions_seen: int = 0

    def dump(self) -> dict[str, Any]:
        return asdict(self) | {"drop_page_ids": len(self.drop_page_ids)}


def newest_revisions(files: Iterable[Location], progress: bool = False) -> Revisions:
    """The newest revision of every page across the day files (read in the order given)."""
    newest: dict[int, Page] = {}
    seen = 0
    highest: list[int] = []
    for source in files:
        highest.append(0)
        for page in tqdm(iter_pages(source), desc="adds-changes", unit="page",
                         disable=None if progress else True, leave=False):
            seen += page.revisions
            highest[-1] = max(highest[-1], page.rev_id)
            if page.ns != 0:  # only its id, title and namespace matter: it may have left the main namespace
                page = Page(page.page_id, page.rev_id, page.title, page.ns, page.redirect, page.model, "")
            held = newest.get(page.page_id)
            if held is None or page.rev_id > held.rev_id:
                newest[page.page_id] = page
    return Revisions(pages=newest, revisions_seen=seen, highest=highest)


def write_delta_passages(revisions: Revisions, parent_pages: dict[int, ParentPage], out: Location,
                         source: SourceDump, *, first_row_id: int,
                         shard_rows: int = DEFAULT_SHARD_ROWS, options: CleanOptions | None = None,
                         progress: bool = False, denied: Collection[int] = frozenset(),
                         work: Location | None = None, chunker: str = "dpr") -> DeltaPlan:
    """Passage shards (row ids from `first_row_id`) of the pages the days change, and what they change.

    `denied` pages (taken down: `storage.denylist`) gain no passages whatever the days hold, and the
    parent's rows of them are dropped (`parent_pages` must list the denied pages the parent serves).
    Writes nothing when no page gains passages (the plan may still drop pages: a delta with no rows of
    its own, `tasks.empty_rows`). `work` (default: `_work` beside `out`, in the staging version) holds
    the scratch while the shards are assembled, and is removed after. `chunker`: the lineage's
    (`EncoderFingerprint.chunker`), so the changed pages are cut as the pages it keeps were."""
    options = options or CleanOptions.for_wiki(source.wiki)
    plan = DeltaPlan(revisions_seen=revisions.revisions_seen)
    skipped: Counter[str] = Counter()
    fresh: list[Page] = []
    for page_id in sorted(set(denied) & parent_pages.keys()):
        plan.drop_page_ids.append(page_id)
        plan.taken_down.append([page_id, parent_pages[page_id].title])
    for page_id in sorted(revisions.removed):
        gone, held = revisions.removed[page_id], parent_pages.get(page_id)
        if held is None or held.removed or page_id in denied:
            continue  # nothing of it is served
        if held.rev_id == gone.rev_id or (not gone.exact and held.rev_id < gone.rev_id):
            plan.drop_page_ids.append(page_id)
            plan.removed.append([page_id, gone.rev_id, f"{held.title} ({gone.reason})"])
        else:
            plan.stale += 1
    parent_pages = {k: v for k, v in parent_pages.items() if k not in set(plan.drop_page_ids)}
    for page_id in sorted(revisions.pages):
        page = revisions.pages[page_id]
        held = parent_pages.get(page_id)
        if page_id in denied:
            plan.denied += 1
        elif held is not None and page.rev_id <= held.rev_id:
            plan.stale += 1
        elif page.ns != 0 and (held is None or held.removed):
            plan.ignored_namespace += 1
        else:
            fresh.append(page)
    # A page the lineage removed is, for what follows, a page the parent does not serve.
    parent_pages = {k: v for k, v in parent_pages.items() if not v.removed}

    work = work or out.sibling(join(out.path.rstrip("/").rsplit("/", 1)[0], WORK_DIR))
    work_fs = work.fs
    unit_path = join(work.path, "unit-000000.parquet")
    try:
        rows: dict[str, list] = {name: [] for name in UNIT_SCHEMA.names}
        kept = words = 0
        cleaned = clean_and_chunk(tqdm(fresh, desc="changed pages", unit="page", disable=None if progress else True,
                                       leave=False), options, cleaner_for(options), chunker)
        for done in cleaned:
            page, held = done.page, parent_pages.get(done.page.page_id)
            if done.reason:
                if held is None:
                    skipped[done.reason] += 1
                    continue
                plan.drop_page_ids.append(page.page_id)
                if done.reason == "redirect":
                    plan.redirected.append([page.page_id, page.title])
                else:
                    plan.emptied.append([page.page_id, f"{page.title} ({done.reason})"])
                continue
            kept += 1
            words += done.words
            plan.passages += len(done.chunks)
            add_rows(rows, done.chunks)
            if held is None:
                plan.added.append([page.page_id, page.title])
                continue
            plan.drop_page_ids.append(page.page_id)
            if held.title != page.title:
                plan.moved.append([page.page_id, f"{held.title} → {page.title}"])
            else:
                plan.changed.append([page.page_id, page.title])
        plan.skipped = dict(sorted(skipped.items()))
        if plan.passages:  # a removal alone is a delta with no rows of its own
            with atomic_write(work_fs, unit_path) as f:
                pq.write_table(pa.Table.from_pydict(rows, schema=UNIT_SCHEMA), f, compression="zstd")
            record = UnitRecord(
                unit={"ordinal": 0, "url": source.location, "start": None, "end": None},
                options=options_key(options, chunker), ordinal=0, path=to_url(work_fs, unit_path),
                sha256=file_digest(work_fs, unit_path),
                seen=len(revisions.pages), kept=kept, skipped=plan.skipped, passages=plan.passages, words=words,
                seconds=0.0,
            ).dump()
            assemble([record], out, source, shard_rows, first_row_id=first_row_id)
    finally:
        if work_fs.exists(work.path):
            work_fs.rm(work.path, recursive=True)
    return plan
