"""Adds-changes days -> the newest revision per page, how it changes the parent, and its passages."""

from __future__ import annotations

import bz2
import json

import pyarrow.parquet as pq

from storage.location import Location
from storage.manifest import SourceDump
from tasks.delta_passages import ParentPage, newest_revisions, write_delta_passages
from tasks.download import resolve_source
from tasks.passages import write_passages
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.mirror import Page, make_dump

SOURCE = SourceDump(wiki="enwiki", dump_date="20240103", location="memory://days")


def _words(tag: str, n: int = 150) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _day(tmp_path, name: str, pages: list[HistPage]) -> str:
    path = tmp_path / name
    path.write_bytes(bz2.compress(history_xml("enwiki", pages).encode()))
    return str(path)


def _rows(out) -> list[dict]:
    summary = json.loads((out / "passages.json").read_text())
    return [r for s in summary["shards"] for r in pq.read_table(out / s["name"]).to_pylist()]


def test_the_newest_revision_wins_across_revisions_and_days(tmp_path):
    day1 = _day(tmp_path, "d1.xml.bz2", [
        HistPage(1, "Twice", [(101, _words("first")), (102, _words("second"))]),
        HistPage(2, "Later", [(103, _words("day one"))]),
        HistPage(3, "Talk:Twice", [(104, "talk talk")], ns=1),
    ])
    day2 = _day(tmp_path, "d2.xml.bz2", [HistPage(2, "Later", [(105, _words("day two"))])])
    revisions = newest_revisions([Location(day1), Location(day2)])
    assert revisions.revisions_seen == 5
    assert revisions.pages[1].rev_id == 102 and revisions.pages[1].text.startswith("second0")
    assert revisions.pages[2].rev_id == 105 and "two" in revisions.pages[2].text
    assert revisions.pages[3].ns == 1 and revisions.pages[3].text == ""  # kept only to see it left ns 0
    # Read in the other order, the same revisions win: ids decide, not file order.
    assert {k: v.rev_id for k, v in newest_revisions([Location(day2), Location(day1)]).pages.items()} == \
        {k: v.rev_id for k, v in revisions.pages.items()}


def test_pages_are_classified_against_the_parent(tmp_path):
    day = _day(tmp_path, "d.xml.bz2", [
        HistPage(10, "Edited", [(201, _words("edited"))]),
        HistPage(11, "Brand new", [(202, _words("new"))]),
        HistPage(12, "New title", [(203, _words("moved"))]),
        HistPage(13, "Now a redirect", [(204, "#REDIRECT [[Edited]]")], redirect="Edited"),
        HistPage(14, "Mercury (disambiguation)", [(205, "'''Mercury''' may refer to:\n* [[Mercury (planet)]]")]),
        HistPage(15, "Stale", [(99, _words("older"))]),
        HistPage(16, "Talk:Edited", [(206, "talk")], ns=1),
        HistPage(17, "Draft:Left main", [(207, _words("draft"))], ns=118),
        HistPage(18, "New redirect", [(208, "#REDIRECT [[Edited]]")], redirect="Edited"),
    ])
    parent = {10: ParentPage(150, "Edited"), 12: ParentPage(150, "Old title"), 13: ParentPage(150, "Now a redirect"),
              14: ParentPage(150, "Mercury (disambiguation)"), 15: ParentPage(100, "Stale"),
              17: ParentPage(150, "Left main")}
    out = tmp_path / "out"
    plan = write_delta_passages(newest_revisions([Location(day)]), parent, Location(out), SOURCE, first_row_id=1000)

    assert plan.added == [[11, "Brand new"]]
    assert plan.changed == [[10, "Edited"]]
    assert plan.moved == [[12, "Old title → New title"]]
    assert plan.redirected == [[13, "Now a redirect"]]
    assert [p for p, _ in plan.emptied] == [14, 17]
    assert "namespace" in plan.emptied[1][1]
    assert plan.stale == 1 and plan.ignored_namespace == 1
    assert plan.skipped == {"redirect": 1}
    assert sorted(plan.drop_page_ids) == [10, 12, 13, 14, 17]

    rows = _rows(out)
    assert plan.passages == len(rows) == 6  # 150 words -> 2 passages, for pages 10, 11 and 12
    assert [r["row_id"] for r in rows] == list(range(1000, 1006))
    assert {r["page_id"] for r in rows} == {10, 11, 12}
    assert {r["title"] for r in rows if r["page_id"] == 12} == {"New title"}
    assert json.loads((out / "passages.json").read_text())["source"]["dump_date"] == "20240103"


def test_a_day_gives_the_same_passages_as_a_full_build_of_the_same_text(tmp_path):
    text = "'''Lead''' is a [[chemical element]] with symbol Pb.<ref>cite</ref> " + _words("dense", 180) \
        + "\n== See also ==\n* [[Tin]]"
    run = make_dump(tmp_path / "m", "enwiki", "20240101", [Page(7, "Lead", text, rev_id=300)])
    ref = resolve_source(str(run))
    write_passages([Location(f.url) for f in ref.files], Location(tmp_path / "full"), ref.source(), workers=1,
                   progress=False)
    day = _day(tmp_path, "d.xml.bz2", [HistPage(7, "Lead", [(299, "older text"), (300, text)])])
    write_delta_passages(newest_revisions([Location(day)]), {}, Location(tmp_path / "delta"), SOURCE, first_row_id=0)

    def key(rows):
        return [(r["passage_id"], r["rev_id"], r["text"], r["content_hash"]) for r in rows]

    assert key(_rows(tmp_path / "delta")) == key(_rows(tmp_path / "full"))


def test_nothing_is_written_when_no_page_gains_passages(tmp_path):
    day = _day(tmp_path, "d.xml.bz2", [HistPage(13, "Gone", [(204, "#REDIRECT [[X]]")], redirect="X")])
    out = tmp_path / "out"
    plan = write_delta_passages(newest_revisions([Location(day)]), {13: ParentPage(1, "Gone")}, Location(out), SOURCE,
                                first_row_id=5)
    assert plan.passages == 0 and plan.drop_page_ids == [13] and not out.exists()
