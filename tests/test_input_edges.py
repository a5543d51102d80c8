"""Input edges: names, atomic writes on S3, oversized passages, XML encodings, dump sources, downloads."""

from __future__ import annotations

import pytest

from storage import names
from storage.errors import InvalidName
from storage.fs import atomic_write
from storage.location import Location
from tests.fixtures.mirror import page_xml, sample_pages


@pytest.mark.parametrize("bad", [".", "..", "enwiki-20240101-20240101t000000z\n", "x\n", "a\nb"])
def test_version_and_file_names_match_the_whole_string(bad):
    with pytest.raises(InvalidName):
        names.check_version_id(bad)
    with pytest.raises(InvalidName):
        names.check_file_name(bad)


@pytest.mark.parametrize("check, bad", [(names.check_wiki, "enwiki\n"), (names.check_dump_date, "20240101\n")])
def test_wiki_and_date_refuse_a_trailing_newline(check, bad):
    with pytest.raises(InvalidName):
        check(bad)


def test_atomic_write_leaves_nothing_when_the_writer_raises(store):
    path = store.path("downloads", "half.bin")
    with pytest.raises(RuntimeError), atomic_write(store.fs, path) as f:
        f.write(b"x" * 1000)
        raise RuntimeError("writer died")
    assert not store.fs.exists(path)
    with atomic_write(store.fs, path) as f:
        f.write(b"whole")
    assert store.fs.cat_file(path) == b"whole"


# -- dump sources and downloads ------------------------------------------------------------------

UA = "ragindex-tests/1.0 (test suite)"


def test_mirror_redirects_must_stay_on_the_mirror_host(mirror, tmp_path):
    from storage.errors import Rejected
    from storage.store import IndexStore
    from tasks.download import download_dump, resolve_dump

    mirror.add_run("enwiki", "20240101", sample_pages(3))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    name = ref.files[0].name
    port = mirror.url.rsplit(":", 1)[1]
    elsewhere = f"http://localhost:{port}/enwiki/20240101/{name}"  # the same server under another host name
    mirror.redirect_next(name, elsewhere)
    with pytest.raises(Rejected, match="another host"):
        download_dump(ref, IndexStore(str(tmp_path / "a")), UA, progress=False, retries=0)
    assert len(mirror.gets(name)) == 1  # the redirect was not followed
    mirror.redirect_next(name, f"{mirror.url}/enwiki/20240101/{name}?moved=1")  # same host: fine
    urls = download_dump(ref, IndexStore(str(tmp_path / "b")), UA, progress=False, retries=0)
    assert len(urls) == len(ref.files) and any(r["path"].endswith("?moved=1") for r in mirror.requests)


def test_a_download_that_nothing_can_verify_needs_an_opt_in(mirror, tmp_path):
    import json

    from storage.errors import Rejected
    from storage.store import IndexStore
    from tasks.download import download_dump, resolve_dump

    run = mirror.add_run("enwiki", "20240101", sample_pages(3))
    status = json.loads((run / "dumpstatus.json").read_text())
    for meta in status["jobs"]["articlesmultistreamdump"]["files"].values():
        meta.pop("sha1"), meta.pop("size"), meta.pop("md5", None)
    (run / "dumpstatus.json").write_text(json.dumps(status))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    assert all(f.sha1 is None and f.size is None for f in ref.files)
    with pytest.raises(Rejected, match="neither size nor sha1"):
        download_dump(ref, IndexStore(str(tmp_path / "a")), UA, progress=False)
    assert mirror.gets(ref.files[0].name) == []  # refused before fetching anything
    urls = download_dump(ref, IndexStore(str(tmp_path / "b")), UA, progress=False, allow_unverified=True)
    assert len(urls) == len(ref.files)


def test_a_source_of_unknown_wiki_can_be_named_with_wiki(tmp_path):
    from flows.params import RefreshParams
    from flows.refresh import resolve_dump_task
    from flows.settings import load_settings
    from storage.errors import Rejected
    from tasks.download import resolve_source

    anonymous = tmp_path / "export.xml"  # Special:Export output saved under any name, no <dbname>
    anonymous.write_text(f"<mediawiki>{''.join(page_xml(p) for p in sample_pages(2))}</mediawiki>")
    with pytest.raises(Rejected, match="--wiki"):
        resolve_source(str(anonymous))
    assert resolve_source(str(anonymous), wiki="frwiki").wiki == "frwiki"
    p = RefreshParams.from_flow(load_settings(), source=str(anonymous), wiki="frwiki")
    assert resolve_dump_task.fn(p).wiki == "frwiki"
    named = tmp_path / "enwiki-20240101-pages-articles.xml"
    named.write_text(anonymous.read_text())
    with pytest.raises(Rejected, match="not of --wiki frwiki"):
        resolve_source(str(named), wiki="frwiki")


# -- XML in any encoding XML allows ----------------------------------------------------------------

def _pages_with_accents(n: int) -> list:
    from tests.fixtures.mirror import Page

    return [Page(page_id=10 + i, title=f"Été {i}", text=f"Ünïcödé wörds ☃ {i} " * 30) for i in range(n)]


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be"])
def test_a_utf16_export_is_read_whole_and_by_stream_ranges(tmp_path, codec):
    import bz2

    from tasks.download import resolve_source
    from tasks.parse import iter_pages
    from tasks.passages import plan_units
    from tests.fixtures.mirror import FOOTER, header_xml

    pages = _pages_with_accents(6)
    declaration = f'<?xml version="1.0" encoding="{codec.upper()}"?>\n'
    piece = "utf-16-le" if codec == "utf-16" else codec  # later streams carry no BOM
    export = tmp_path / "Special-Export.xml"  # a name that says nothing: the wiki comes from <dbname>
    export.write_bytes((declaration + header_xml("dewiki") + "".join(page_xml(p) for p in pages) + FOOTER)
                       .encode(codec))
    ref = resolve_source(str(export))
    assert ref.wiki == "dewiki"
    assert [(p.title, p.text) for p in iter_pages(Location(export))] == [(p.title, p.text) for p in pages]

    multi = tmp_path / "Special-Export.xml.bz2"
    offsets = []
    with open(multi, "wb") as out:
        out.write(bz2.compress((declaration + header_xml("dewiki")).encode(codec)))
        for i in range(0, len(pages), 2):
            offsets.append(out.tell())
            out.write(bz2.compress("".join(page_xml(p) for p in pages[i:i + 2]).encode(piece)))
        out.write(bz2.compress(FOOTER.encode(piece)))
    assert resolve_source(str(multi)).wiki == "dewiki"
    middle = list(iter_pages(Location(multi), start=offsets[1], end=offsets[2]))
    assert [p.title for p in middle] == [pages[2].title, pages[3].title] and middle[0].text == pages[2].text
    head = [p.title for p in iter_pages(Location(multi), end=offsets[1])]
    assert head == [pages[0].title, pages[1].title]
    units = plan_units([Location(multi)], workers=4, min_unit_bytes=1)
    assert len(units) > 1  # cut at stream starts, each found to begin with a <page> in UTF-16
    read = [p.title for u in units for p in iter_pages(Location(u.url), u.start, u.end)]
    assert read == [p.title for p in pages]
