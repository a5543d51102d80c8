"""The `ragindex versions` table, fitted to the terminal.

An 80-column terminal gets what an operator acts on: the marks, the whole version id (what they copy
into promote / rollback: never cut or wrapped), its status, what it serves, full or delta, and its
size. From WIDE_FROM columns on the index, shared size and creation time join them; from
LINEAGE_TEXT_FROM on the lineage is spelled out, where the parent's id has room to stay whole.
From WIDE_FROM on too, once a store holds a signed version or the reader trusts keys, a `signer`
column says who signed each one (its key id, `unsigned` or `invalid`), in red what the reader's
trusted keys refuse; narrower, those refused versions are named below the table, one line each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from storage.catalog import INVALID, UNSIGNED, Catalog, VersionEntry
from storage.sizes import format_size

WIDE_FROM = 120
LINEAGE_TEXT_FROM = 160

Cell = Callable[[VersionEntry], str]


def _marks(row: VersionEntry) -> str:
    return " ".join(m for m, on in (("CURRENT", row.current), ("previous", row.previous), ("pinned", row.pinned))
                    if on)


def _status(row: VersionEntry) -> str:
    return row.status if row.status == "ready" else f"[red]{row.status}[/red]"


def _passages(row: VersionEntry) -> str:
    if row.corrupt:
        return ""
    # A delta serves its segments' rows besides its own: what it serves, then what it stores.
    return f"{row.live_passages} ({row.passages} own)" if row.lineage.mode != "full" else str(row.passages)


def _mode(row: VersionEntry) -> str:
    if row.corrupt:
        return ""
    n = len(row.missing_segments)
    missing = f", {n} missing segment{'s' if n != 1 else ''}" if n else ""
    return row.lineage.mode + missing


def _index(row: VersionEntry) -> str:
    return "manifest unreadable" if row.corrupt else f"{row.index_spec} ({row.factory})"


def _signer(row: VersionEntry) -> str:
    if row.corrupt:
        return ""
    return f"[red]{row.signed_by}[/red]" if row.trusted is False or row.signed_by == INVALID else row.signed_by


def _shared(row: VersionEntry) -> str:
    return format_size(row.shared_bytes) if row.shared_bytes else ""


def _created(row: VersionEntry) -> str:
    return row.created_at.strftime("%Y-%m-%d %H:%M:%S") if row.created_at else ""


class Column(NamedTuple):
    header: str
    cell: Cell
    right: bool = False  # numbers


_MARKS = Column("", _marks)
_VERSION = Column("version", lambda r: r.version)
_STATUS = Column("status", _status)
_PASSAGES = Column("passages", _passages, right=True)
_SIZE = Column("size", lambda r: format_size(r.own_bytes), right=True)
_INDEX = Column("index", _index)
_SHARED = Column("shared", _shared, right=True)
_CREATED = Column("created", _created)
_SIGNER = Column("signer", _signer)


def _columns(width: int, deltas: bool, signatures: bool) -> list[Column]:
    wide = width >= WIDE_FROM
    lineage = Column("lineage", VersionEntry.lineage_text) if width >= LINEAGE_TEXT_FROM else Column("mode", _mode)
    columns = [_MARKS, _VERSION, _STATUS, _PASSAGES, lineage, *([_INDEX] if wide else []), _SIZE,
               *([_SHARED, _CREATED] if wide else []), *([_SIGNER] if wide and signatures else [])]
    # Lineage and shared size only mean something once there is a delta.
    return [c for c in columns if deltas or c not in (lineage, _SHARED)]


def versions_table(catalog: Catalog, width: int) -> Table:
    """The table for a terminal `width` columns wide."""
    columns = _columns(width, catalog.has_deltas, catalog.has_signatures)
    # No vertical rules, two spaces between columns: the id alone takes 31+ of 80 columns.
    table = Table(title=Text(f"versions in {catalog.store}", overflow="fold"), box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for c in columns:
        table.add_column(c.header, justify="right" if c.right else "left", no_wrap=c is _VERSION, overflow="fold")
    for row in catalog.versions:
        table.add_row(*(c.cell(row) for c in columns))
    return table


def print_versions(catalog: Catalog) -> None:
    console = Console()
    console.print(versions_table(catalog, console.width))
    for row in catalog.versions:  # below the table, where a long path has the whole width
        if row.corrupt:
            console.print(f"{row.version}: manifest unreadable: {row.path}", overflow="fold", markup=False)
        elif row.trusted is False and console.width < WIDE_FROM:  # the signer column is not shown
            what = {UNSIGNED: UNSIGNED, INVALID: "invalid signature"}.get(row.signed_by, f"signed by {row.signed_by}")
            console.print(f"{row.version}: {what}: not trusted here", overflow="fold", markup=False)
    if not catalog.versions:
        print("no versions yet: run `ragindex build` or `ragindex refresh`")
