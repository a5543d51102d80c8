"""Discovering adds-changes days on a real HTTP mirror on 127.0.0.1, and downloading them verified."""

from __future__ import annotations

import bz2
import hashlib

import pytest

from storage.errors import InvalidName, NotFound, Rejected
from storage.store import IndexStore
from tasks.download import DownloadError
from tasks.incr_dumps import download_day, pending_days
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import incr_dir, make_incr_day, pages_name

UA = "ragindex-tests/1.0 (test suite)"
FAST = {"retries": 1, "backoff_s": 0.01}


def _xml(first_rev: int, pages: int = 3, revisions: int = 2, words: int = 20) -> str:
    return history_xml("enwiki", [
        HistPage(page_id=10 + p, title=f"Article {10 + p}",
                 revisions=[(first_rev + p * revisions + r, " ".join(f"p{p}r{r}w{w}" for w in range(words)))
                            for r in range(revisions)])
        for p in range(pages)
    ])


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _day(mirror, date: str, maxrevid: int, **kwargs):
    return make_incr_day(mirror.root, "enwiki", date, _xml(maxrevid - 10), maxrevid, **kwargs)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_chain_skips_a_missing_day_and_stops_at_the_first_unfinished_one(mirror):
    _day(mirror, "20240101", 100)  # the watermark's own day: not pending
    first = _day(mirror, "20240102", 200)  # 20240103 never ran: its window is in 20240104's
    second = _day(mirror, "20240104", 300, md5_form="two-space")
    _day(mirror, "20240105", 400, status="in-progress")
    _day(mirror, "20240106", 500)  # done, but behind an unfinished day

    chain = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST)

    assert [d.date for d in chain.days] == ["20240102", "20240104"]
    assert [d.maxrevid for d in chain.days] == [200, 300]
    assert (chain.stopped_at, chain.listed) == ("20240105", 4)
    assert chain.stop_reason == "20240105 is not finished (status.txt: 'in-progress')"
    d = chain.days[0]
    assert d.location == f"{mirror.url}/other/incr/enwiki/20240102"
    assert d.file.name == "enwiki-20240102-pages-meta-hist-incr.xml.bz2"
    assert d.file.url == f"{d.location}/{d.file.name}"
    assert (d.file.sha1, d.file.size) == (None, None)
    # both md5sums forms (` *name` and `  name`) are read
    assert d.file.md5 == _md5(first / d.file.name)
    assert chain.days[1].file.md5 == _md5(second / chain.days[1].file.name)
    assert not [r for r in mirror.requests if "/20240106/" in r["path"]]  # never looked past the stop
    assert all(r["user_agent"] == UA for r in mirror.requests)


def test_after_and_until_bound_the_window(mirror):
    for i, date in enumerate(["20240101", "20240102", "20240103", "20240104"]):
        _day(mirror, date, 100 * (i + 1))

    everything = pending_days(mirror.url, "enwiki", None, UA, **FAST)
    window = pending_days(mirror.url, "enwiki", "20240101", UA, until="20240103", **FAST)
    caught_up = pending_days(mirror.url, "enwiki", "20240104", UA, **FAST)

    assert [d.date for d in everything.days] == ["20240101", "20240102", "20240103", "20240104"]
    assert ([d.date for d in window.days], window.listed) == (["20240102", "20240103"], 2)
    assert (caught_up.days, caught_up.listed, caught_up.stopped_at, caught_up.stop_reason) == ([], 0, None, None)
    with pytest.raises(InvalidName):
        pending_days(mirror.url, "enwiki", "2024-01-01", UA, **FAST)


def test_missing_status_stops_and_a_lower_maxrevid_keeps_date_order(mirror):
    _day(mirror, "20240102", 300)
    _day(mirror, "20240103", 250)  # overlapping window: still applied, in date order
    _day(mirror, "20240104", 400, status=None)  # the job has not written its status yet

    chain = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST)

    assert [(d.date, d.maxrevid) for d in chain.days] == [("20240102", 300), ("20240103", 250)]
    assert chain.stopped_at == "20240104"
    assert chain.stop_reason == "20240104 is not finished (no status.txt)"


def test_download_verifies_md5_and_skips_what_is_present(mirror, tmp_path):
    xml = _xml(1000, pages=5)
    make_incr_day(mirror.root, "enwiki", "20240102", xml, 1100)
    store = IndexStore(str(tmp_path / "store"))
    day = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST).days[0]

    url = download_day(day, store, UA, progress=False, **FAST)

    local = tmp_path / "store" / "downloads" / "enwiki" / "20240102" / day.file.name
    assert url == store.downloads_path("enwiki", "20240102", day.file.name)
    assert bz2.decompress(local.read_bytes()).decode() == xml
    assert not list((tmp_path / "store").rglob("*.part"))
    before = len(mirror.gets(day.file.name))
    assert download_day(day, store, UA, progress=False, **FAST) == url
    assert len(mirror.gets(day.file.name)) == before == 1  # the verified copy is not fetched again


def test_md5_mismatch_is_one_line_and_leaves_nothing(mirror, tmp_path):
    _day(mirror, "20240102", 200, corrupt_md5=True)
    store = IndexStore(str(tmp_path / "store"))
    day = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST).days[0]

    with pytest.raises(Rejected) as exc:
        download_day(day, store, UA, progress=False, **FAST)

    actual = _md5(incr_dir(mirror.root, "enwiki", "20240102") / day.file.name)
    assert _one_line(exc) == (f"md5 mismatch for {day.file.name} from {day.file.url}: "
                              f"expected {day.file.md5}, got {actual}")
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_download_resumes_after_the_server_cuts_the_transfer(mirror, tmp_path):
    day_dir = make_incr_day(mirror.root, "enwiki", "20240102", _xml(1000, pages=30, revisions=4, words=60), 1200)
    name = pages_name("enwiki", "20240102")
    size = (day_dir / name).stat().st_size
    assert size > 4000  # big enough for a cut in the middle to mean something
    store = IndexStore(str(tmp_path / "store"))
    day = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST).days[0]
    final = tmp_path / "store" / "downloads" / "enwiki" / "20240102" / name

    mirror.cut_next(name, size // 2)
    download_day(day, store, UA, progress=False, backoff_s=0.01)  # resumed within one call
    assert [g["range"] for g in mirror.gets(name)] == [None, f"bytes={size // 2}-"]
    assert _md5(final) == day.file.md5

    final.unlink()
    mirror.requests.clear()
    mirror.cut_next(name, 1000)
    with pytest.raises(DownloadError, match="rerun to resume"):
        download_day(day, store, UA, retries=0, progress=False)
    assert not final.exists()  # nothing half-written under the final name
    download_day(day, store, UA, retries=0, progress=False)  # ...and resumed by the next run
    assert [g["range"] for g in mirror.gets(name)] == [None, "bytes=1000-"]
    assert _md5(final) == day.file.md5


@pytest.mark.parametrize("content", ["", "12a", "12 34", "-5", "1\n2"])
def test_malformed_maxrevid_is_one_line(mirror, content):
    day_dir = _day(mirror, "20240102", 200)
    (day_dir / "maxrevid.txt").write_text(content)
    with pytest.raises(Rejected, match="malformed maxrevid") as exc:
        pending_days(mirror.url, "enwiki", "20240101", UA, **FAST)
    assert f"{mirror.url}/other/incr/enwiki/20240102/maxrevid.txt" in _one_line(exc)


def test_md5sums_without_the_file_is_one_line(mirror):
    day_dir = _day(mirror, "20240102", 200)
    sums = day_dir / "enwiki-20240102-md5sums.txt"
    sums.write_text("".join(line for line in sums.read_text().splitlines(keepends=True) if "pages-meta" not in line))
    assert sums.read_text()  # the stubs line is still there
    with pytest.raises(Rejected, match="has no md5 line for enwiki-20240102-pages-meta-hist-incr.xml.bz2") as exc:
        pending_days(mirror.url, "enwiki", "20240101", UA, **FAST)
    _one_line(exc)
    sums.unlink()
    with pytest.raises(Rejected, match="md5sums.txt not found"):
        pending_days(mirror.url, "enwiki", "20240101", UA, **FAST)


def test_wiki_without_an_incr_directory_is_one_line(mirror):
    _day(mirror, "20240102", 200)  # enwiki has days; dewiki has none
    with pytest.raises(NotFound) as exc:
        pending_days(mirror.url, "dewiki", "20240101", UA, **FAST)
    assert f"{mirror.url}/other/incr/dewiki/" in _one_line(exc)
    assert "dewiki" in str(exc.value) and "incr" in str(exc.value)


def test_a_republished_day_is_fetched_again(mirror, store):
    """A day whose pages file was cut short (and matched its md5), then republished whole with a new md5:
    the stored copy is checked against the md5 published now and fetched again, on disk and on S3."""
    name = pages_name("enwiki", "20240102")
    make_incr_day(mirror.root, "enwiki", "20240102", _xml(1000, pages=1), 1005)  # revisions 1000-1001 of 1005
    day = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST).days[0]
    url = download_day(day, store, UA, progress=False, **FAST)  # (applying it is refused: test_delta_version)

    make_incr_day(mirror.root, "enwiki", "20240102", _xml(1000, pages=3), 1005)  # revisions 1000-1005
    again = pending_days(mirror.url, "enwiki", "20240101", UA, **FAST).days[0]
    assert again.file.md5 != day.file.md5

    assert download_day(again, store, UA, progress=False, **FAST) == url
    assert len(mirror.gets(name)) == 2  # fetched again, not kept because it was present
    with store.fs.open(store.downloads_path("enwiki", "20240102", name), "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == again.file.md5
    assert download_day(again, store, UA, progress=False, **FAST) == url
    assert len(mirror.gets(name)) == 2  # what still matches is not fetched a third time
