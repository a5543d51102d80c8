"""What differs between two versions, page by page: the one computation behind `ragindex diff`,
`GET /v1/diff` and the console's diff table.

Read from the rows each version serves (`rag_model.lineage.served_rows`: every file checked against
the manifest that names it), not from a delta's recorded `changes`, so any two versions compare: two
full builds, a delta and its base, or versions of different lineages. Bytes come from the store's
catalogue, the one place that sums them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rag_model.index import revision_url, wiki_language
from rag_model.lineage import served_rows
from storage.catalog import Catalog, read_catalog
from storage.errors import NotFound
from storage.manifest import Manifest
from storage.store import IndexStore


@dataclass(frozen=True)
class PageChange:
    page_id: int
    title: str  # the title in the newer side (the older one's for a removed page)
    old_title: str | None  # set when the title differs (a move)
    old_rev: int | None
    new_rev: int | None
    old_passages: int
    new_passages: int
    url: str  # the revision the change lands on (the removed one's last revision for a removal)

    def to_json(self) -> dict[str, Any]:
        return {"page_id": self.page_id, "title": self.title, "old_title": self.old_title, "old_rev": self.old_rev,
                "new_rev": self.new_rev, "old_passages": self.old_passages, "new_passages": self.new_passages,
                "url": self.url}


@dataclass(frozen=True)
class VersionDiff:
    a: str
    b: str
    passages_a: int  # rows each serves
    passages_b: int
    rows_only_a: int  # rows served by a and not b (row ids are global within a lineage)
    rows_only_b: int
    bytes_a: int  # own + shared bytes: what each serves
    bytes_b: int
    bytes_only_b: int  # stored bytes b serves that a's lineage does not hold: what b costs on top of a
    added: list[PageChange] = field(default_factory=list)
    changed: list[PageChange] = field(default_factory=list)  # new revision (and moves: a new title)
    removed: list[PageChange] = field(default_factory=list)

    @property
    def moved(self) -> list[PageChange]:
        return [c for c in self.changed if c.old_title is not None]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b,
                "passages": {"a": self.passages_a, "b": self.passages_b, "only_a": self.rows_only_a,
                             "only_b": self.rows_only_b},
                "bytes": {"a": self.bytes_a, "b": self.bytes_b, "only_b": self.bytes_only_b},
                "pages": {"added": len(self.added), "changed": len(self.changed), "moved": len(self.moved),
                          "removed": len(self.removed)},
                "added": [c.to_json() for c in self.added], "changed": [c.to_json() for c in self.changed],
                "removed": [c.to_json() for c in self.removed]}


@dataclass(frozen=True)
class _Pages:
    """Per page a version serves: its revision, title and passage count; and the row ids it serves."""

    revs: dict[int, tuple[int, str, int]]
    row_ids: np.ndarray


def _pages(store: IndexStore, manifest: Manifest) -> _Pages:
    tables = list(served_rows(store, manifest, ["page_id", "rev_id", "title"]))
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        return _Pages({}, np.empty(0, dtype=np.int64))
    grouped = table.group_by("page_id").aggregate([("rev_id", "max"), ("title", "max"), ("row_id", "count")])
    revs = {int(p): (int(r), str(t), int(n)) for p, r, t, n in zip(
        grouped.column("page_id").to_pylist(), grouped.column("rev_id_max").to_pylist(),
        grouped.column("title_max").to_pylist(), grouped.column("row_id_count").to_pylist(), strict=True)}
    return _Pages(revs, np.sort(table.column("row_id").to_numpy()))


def diff_versions(store: IndexStore, a: str, b: str, catalog: Catalog | None = None) -> VersionDiff:
    """Pages added, changed (moves included) and removed from version `a` to version `b`, with the
    passages and bytes each serves (`catalog`: a catalogue already read, for its bytes)."""
    ma, mb = store.manifest(a), store.manifest(b)
    catalog = catalog or read_catalog(store)
    entries = {v.version: v for v in catalog.versions}
    for v in (a, b):
        if v not in entries:
            raise NotFound(f"no version {v!r} in {store.url}")
    pa_, pb = _pages(store, ma), _pages(store, mb)
    lang = wiki_language(mb.source.wiki)
    added, changed, removed = [], [], []
    for page_id in sorted(pb.revs.keys() - pa_.revs.keys()):
        rev, title, n = pb.revs[page_id]
        added.append(PageChange(page_id, title, None, None, rev, 0, n, revision_url(lang, page_id, rev)))
    for page_id in sorted(pb.revs.keys() & pa_.revs.keys()):
        (old_rev, old_title, old_n), (rev, title, n) = pa_.revs[page_id], pb.revs[page_id]
        if (old_rev, old_title) != (rev, title):
            changed.append(PageChange(page_id, title, old_title if old_title != title else None, old_rev, rev,
                                      old_n, n, revision_url(lang, page_id, rev)))
    for page_id in sorted(pa_.revs.keys() - pb.revs.keys()):
        rev, title, n = pa_.revs[page_id]
        removed.append(PageChange(page_id, title, None, rev, None, n, 0, revision_url(lang, page_id, rev)))
    ea, eb = entries[a], entries[b]
    held_by_a = {a, *(ea.lineage.segments if ea.lineage else ())}
    return VersionDiff(
        a=a, b=b, passages_a=len(pa_.row_ids), passages_b=len(pb.row_ids),
        rows_only_a=len(np.setdiff1d(pa_.row_ids, pb.row_ids, assume_unique=True)) if _same_lineage(ma, mb)
        else len(pa_.row_ids),
        rows_only_b=len(np.setdiff1d(pb.row_ids, pa_.row_ids, assume_unique=True)) if _same_lineage(ma, mb)
        else len(pb.row_ids),
        bytes_a=ea.own_bytes + (ea.shared_bytes or 0), bytes_b=eb.own_bytes + (eb.shared_bytes or 0),
        bytes_only_b=sum(entries[v].own_bytes for v in (b, *(eb.lineage.segments if eb.lineage else ()))
                         if v not in held_by_a and v in entries),
        added=added, changed=changed, removed=removed)


def _same_lineage(a: Manifest, b: Manifest) -> bool:
    """Row ids name the same passage only inside one lineage (a full build numbers its rows from 0)."""
    return a.effective_lineage.base_version == b.effective_lineage.base_version
