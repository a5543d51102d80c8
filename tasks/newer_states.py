"""Never backwards: a full build keeps what the serving lineage knows that is newer than its dump.

Live runs (and nightly days) keep applying changes to CURRENT's lineage; the next full dump, finished days
later, is older than what they served. Before a full build assembles its passages, for every page where
CURRENT's lineage serves a newer revision than the dump, the lineage's rows of that page replace the
dump's; every page the lineage removed (deleted, hidden, moved out) at a revision the dump does not pass
is left out. A page the dump lacks is kept from the lineage only when its revision is above every
revision the dump holds (created after the dump); otherwise the dump's absence is a deletion it reconciles.

The unit outputs are not rewritten: filtered copies and one unit of the lineage's rows are written beside
them, so the cached unit results stay valid for a re-run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_model.lineage import lineage_manifests, served_rows
from storage.fs import atomic_write, file_digest, join
from storage.layout import UNIT_SCHEMA
from storage.location import Location
from storage.manifest import Manifest
from storage.records import UnitRecord
from storage.store import IndexStore
from tasks.chunk import content_hash
from tasks.delta_version import lineage_removals


@dataclass
class NewerStates:
    records: list[dict]
    kept_newer: int = 0  # pages whose lineage revision replaced the dump's
    kept_removed: int = 0  # pages the lineage removed after the dump's revision


def keep_newer_states(store: IndexStore, current: Manifest | None, wiki: str, unit_results: list[dict],
                      work: Location) -> NewerStates:
    """The unit records to assemble: the dump's, overridden where `current`'s lineage is newer."""
    if current is None or not current.is_delta or current.source.wiki != wiki:
        return NewerStates(unit_results)
    records = [UnitRecord.load(r, "a work unit's record") for r in unit_results]
    dump_rev: dict[int, int] = {}
    for record in records:
        unit = work.reach(record.path)
        with unit.fs.open(unit.path, "rb") as f:
            table = pq.read_table(f, columns=["page_id", "rev_id"])
        for page, rev in zip(table.column("page_id").to_pylist(), table.column("rev_id").to_pylist(), strict=True):
            dump_rev[page] = max(rev, dump_rev.get(page, rev))
    newest_in_dump = max(dump_rev.values(), default=0)

    newer_rows: list[pa.Table] = []
    newer: set[int] = set()
    columns = ["passage_id", "page_id", "rev_id", "title", "text"]
    for table in served_rows(store, current, columns):
        pages, revs = table.column("page_id").to_numpy(), table.column("rev_id").to_numpy()
        held = np.array([dump_rev.get(int(p), -1) for p in pages], dtype=np.int64)
        wins = (revs > held) & ((held >= 0) | (revs > newest_in_dump))
        if wins.any():
            picked = table.filter(pa.array(wins)).select(columns)
            newer_rows.append(picked)
            newer.update(int(p) for p in picked.column("page_id").to_pylist())
    removed = {page for page, (rev, _) in lineage_removals(lineage_manifests(store, current)).items()
               if page in dump_rev and page not in newer and rev >= dump_rev[page]}
    override = newer | removed
    if not override:
        return NewerStates(unit_results)

    out: list[dict] = []
    for record in records:
        unit = work.reach(record.path)
        with unit.fs.open(unit.path, "rb") as f:
            table = pq.read_table(f)
        keep = ~np.isin(table.column("page_id").to_numpy(), np.fromiter(override, dtype=np.int64))
        if keep.all():
            out.append(record.dump())
            continue
        out.append(_write_unit(work, f"newer-states-{record.ordinal:06d}.parquet", table.filter(pa.array(keep)),
                               record).dump())
    if newer_rows:
        rows = pa.concat_tables(newer_rows).sort_by([("page_id", "ascending"), ("passage_id", "ascending")])
        hashes = [content_hash(t, x) for t, x in zip(rows.column("title").to_pylist(), rows.column("text").to_pylist(),
                                                     strict=True)]
        table = pa.Table.from_arrays([rows.column(n) if n != "content_hash" else pa.array(hashes, pa.string())
                                      for n in UNIT_SCHEMA.names], schema=UNIT_SCHEMA)
        last = max((r.ordinal for r in records), default=-1) + 1
        template = UnitRecord(unit={"ordinal": last, "url": f"lineage:{current.version}", "start": None, "end": None},
                              options=records[0].options if records else "", ordinal=last, path="", seen=len(newer),
                              kept=len(newer), passages=0, words=0, seconds=0.0)
        out.append(_write_unit(work, f"newer-states-{last:06d}.parquet", table, template).dump())
    return NewerStates(out, kept_newer=len(newer), kept_removed=len(removed))


def _write_unit(work: Location, name: str, table: pa.Table, like: UnitRecord) -> UnitRecord:
    path = join(work.path, name)
    with atomic_write(work.fs, path) as f:
        pq.write_table(table, f, compression="zstd")
    words = sum(len(t.split()) for t in table.column("text").to_pylist())
    return like.model_copy(update={"path": work.child(name).url, "sha256": file_digest(work.fs, path),
                                   "passages": table.num_rows, "words": words})
