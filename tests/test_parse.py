"""Streaming pages out of .xml, .bz2 and byte ranges of multistream .bz2; bad input named precisely."""

from __future__ import annotations

import bz2

import pytest

from storage.location import Location
from tasks.parse import (
    DumpError,
    iter_pages,
    scan_stream_offsets,
    starts_with_page,
    stream_offsets_from_index,
)
from tasks.passages import plan_units
from tests.fixtures.mirror import Page, dump_xml, make_dump, sample_pages, write_multistream


def _ids(url, start=None, end=None):
    return [p.page_id for p in iter_pages(Location(url), start, end)]


def test_page_fields(tmp_path):
    pages = [Page(5, "Five & <five>", "Body 'text' & more", rev_id=55),
             Page(6, "Talk:Six", "talk", ns=1),
             Page(7, "Seven", "#REDIRECT [[Five]]", redirect="Five & <five>"),
             Page(8, "Module:X", "return {}", model="Scribunto")]
    path = tmp_path / "d.xml"
    path.write_text(dump_xml("enwiki", pages))
    got = list(iter_pages(Location(path)))
    assert [(p.page_id, p.rev_id, p.title, p.ns, p.redirect, p.model) for p in got] == [
        (5, 55, "Five & <five>", 0, False, "wikitext"), (6, 607, "Talk:Six", 1, False, "wikitext"),
        (7, 707, "Seven", 0, True, "wikitext"), (8, 807, "Module:X", 0, False, "Scribunto")]
    assert got[0].text == "Body 'text' & more"


def test_multistream_ranges_cover_the_file_exactly(tmp_path):
    pages = sample_pages(11)
    path = tmp_path / "enwiki-20240101-pages-articles-multistream.xml.bz2"
    index = write_multistream(path, "enwiki", pages, pages_per_stream=2)
    offsets = sorted({int(line.split(":")[0]) for line in index})
    assert scan_stream_offsets(Location(path))[1:-1] == offsets  # header stream first, footer last

    edges = [0, offsets[2], offsets[4], None]
    pieces = [_ids(path, edges[i] or None, edges[i + 1]) for i in range(3)]
    assert sum(pieces, []) == _ids(path) == [p.page_id for p in pages]
    assert pieces[1] == [p.page_id for p in pages[4:8]]


def test_plan_units_by_index_and_by_scanning_agree(tmp_path):
    run = make_dump(tmp_path, "enwiki", "20240101", sample_pages(30), parts=2, pages_per_stream=3)
    files = sorted(str(p) for p in run.glob("*.bz2"))
    data = [f for f in files if "-index" not in f]
    by_index = plan_units([Location(f) for f in files], workers=3, min_unit_bytes=0)
    by_scan = plan_units([Location(f) for f in data], workers=3, min_unit_bytes=0)
    assert by_index == by_scan
    assert len(by_index) > 2 and [u.ordinal for u in by_index] == list(range(len(by_index)))
    index = next(f for f in files if "-index1" in f)
    listed = set(stream_offsets_from_index(Location(index)))
    assert {u.start for u in by_index if u.url == data[0] and u.start} <= listed
    ids = [i for u in by_index for i in _ids(u.url, u.start, u.end)]
    assert ids == [p.page_id for p in sample_pages(30)]
    assert plan_units([Location(f) for f in files], workers=3) == [type(by_index[0])(0, data[0], None, None),
                                            type(by_index[0])(1, data[1], None, None)]  # small: whole files


def test_scanning_never_cuts_inside_a_page(tmp_path):
    """Streams that split pages (pbzip2-style) are not cut points: the file stays one unit."""
    blob = dump_xml("enwiki", sample_pages(20)).encode()
    path = tmp_path / "enwiki-20240101-pages-articles.xml.bz2"
    step = len(blob) // 5
    path.write_bytes(b"".join(bz2.compress(blob[i:i + step]) for i in range(0, len(blob), step)))
    offsets = scan_stream_offsets(Location(path))
    assert len(offsets) >= 5 and not any(starts_with_page(Location(path), o) for o in offsets[1:])
    units = plan_units([Location(path)], workers=4, min_unit_bytes=0)
    assert [(u.start, u.end) for u in units] == [(None, None)]
    assert len(_ids(path)) == 20  # BZ2File reads every concatenated stream


def test_truncated_bz2_names_file_and_offset(tmp_path):
    path = tmp_path / "enwiki-20240101-pages-articles.xml.bz2"
    data = bz2.compress(dump_xml("enwiki", sample_pages(50, words=300)).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DumpError, match=rf"truncated bz2 data in {path.name} near byte \d+"):
        _ids(path)


def test_corrupt_bz2_names_file_and_offset(tmp_path):
    path = tmp_path / "enwiki-20240101-pages-articles.xml.bz2"
    data = bytearray(bz2.compress(dump_xml("enwiki", sample_pages(50, words=300)).encode()))
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(DumpError, match=rf"corrupt bz2 data in {path.name} near byte \d+"):
        _ids(path)


def test_malformed_xml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text(dump_xml("enwiki", sample_pages(3)).replace("</title>", "</titel>", 1))
    with pytest.raises(DumpError, match=r"malformed XML in broken.xml \(stream at byte 0, XML line \d+\)"):
        _ids(path)
    path.write_text(dump_xml("enwiki", sample_pages(2)).replace("<id>10</id>", "<id>ten</id>"))
    with pytest.raises(DumpError, match="malformed page in broken.xml"):
        _ids(path)


def test_missing_file(tmp_path):
    with pytest.raises(DumpError, match="dump file not found"):
        _ids(tmp_path / "nope.xml.bz2")


def test_tree_does_not_grow_with_the_dump(tmp_path):
    """Pages already read are cleared with their preceding siblings: what the tree holds is bounded by
    the parser's read-ahead, not by the dump's size (ten times more pages, no more elements)."""
    from tasks import parse

    original = parse._page

    def widest_tree(n_pages: int) -> int:
        path = tmp_path / f"d{n_pages}.xml"
        path.write_text(dump_xml("enwiki", [Page(i, f"T{i}", "word " * 20) for i in range(1, n_pages + 1)]))
        sizes = []

        def spy(elem):
            sizes.append(len(elem.getroottree().getroot()))
            return original(elem)

        parse._page = spy
        try:
            assert len(_ids(path)) == n_pages
        finally:
            parse._page = original
        return max(sizes)

    small, large = widest_tree(300), widest_tree(3000)
    assert large <= small + 2
