"""Resolving and downloading dumps from a real HTTP mirror on 127.0.0.1, and from local sources."""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import pickle
import shutil
import socket
import stat
import tempfile
import time

import pytest

from storage.errors import InvalidName, NotFound, RagindexError, Rejected
from storage.store import IndexStore
from tasks.download import UNDATED, DownloadError, download_dump, resolve_dump, resolve_source
from tests.fixtures.mirror import dump_xml, make_dump, sample_pages, set_status

UA = "ragindex-tests/1.0 (test suite)"


def _sha1(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_latest_is_newest_finished_run_not_the_latest_dir(mirror):
    mirror.add_run("enwiki", "20240101", sample_pages(3))
    mirror.add_run("enwiki", "20240201", sample_pages(4))
    mirror.add_run("enwiki", "20240301", sample_pages(5), status="in-progress")
    make_dump(mirror.root, "enwiki", "latest", sample_pages(9))  # a mixed-up latest/ must be ignored

    ref = resolve_dump("enwiki", "latest", mirror.url, UA)

    assert (ref.wiki, ref.dump_date) == ("enwiki", "20240201")
    assert ref.location == f"{mirror.url}/enwiki/20240201"
    run = mirror.root / "enwiki" / "20240201"
    assert [f.name for f in ref.files] == [
        "enwiki-20240201-pages-articles-multistream.xml.bz2",
        "enwiki-20240201-pages-articles-multistream-index.txt.bz2",
    ]
    assert [f.sha1 for f in ref.files] == [_sha1(run / f.name) for f in ref.files]
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert ref.source().files[0].size == (run / ref.files[0].name).stat().st_size
    assert all(r["user_agent"] == UA for r in mirror.requests)


def test_explicit_date_and_nonmultistream_job(mirror):
    mirror.add_run("dewiki", "20240101", sample_pages(3), multistream=False, parts=2)
    ref = resolve_dump("dewiki", "20240101", mirror.url, UA, job="articlesdump")
    assert len(ref.files) == 2 and all(".xml-p" in f.name for f in ref.files)
    with pytest.raises(NotFound, match="no job 'articlesmultistreamdump'"):
        resolve_dump("dewiki", "20240101", mirror.url, UA)


def test_unknown_wiki_date_and_unfinished_run(mirror):
    mirror.add_run("enwiki", "20240101", sample_pages(2), status="in-progress")
    with pytest.raises(NotFound, match="no wiki 'frwiki'"):
        resolve_dump("frwiki", "latest", mirror.url, UA)
    with pytest.raises(NotFound, match="no dump enwiki 20231201"):
        resolve_dump("enwiki", "20231201", mirror.url, UA)
    with pytest.raises(NotFound, match="no finished articlesmultistreamdump run"):
        resolve_dump("enwiki", "latest", mirror.url, UA)
    with pytest.raises(Rejected, match="'in-progress', not 'done'"):
        resolve_dump("enwiki", "20240101", mirror.url, UA)
    with pytest.raises(InvalidName):
        resolve_dump("enwiki", "2024-01-01", mirror.url, UA)


def test_unreachable_mirror_is_one_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"cannot reach http://127.0.0.1:{port}/enwiki/"):
        resolve_dump("enwiki", "latest", f"http://127.0.0.1:{port}", UA, retries=1, backoff_s=0.01)


def test_download_verifies_and_skips_what_is_present(mirror, tmp_path):
    run = mirror.add_run("enwiki", "20240101", sample_pages(6), parts=2)
    store = IndexStore(str(tmp_path / "store"))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)

    urls = download_dump(ref, store, UA, progress=False)

    assert [u.rsplit("/", 1)[-1] for u in urls] == [f.name for f in ref.files]
    for f, url in zip(ref.files, urls, strict=True):
        assert url == store.downloads_path("enwiki", "20240101", f.name)
        assert _sha1(tmp_path / "store" / "downloads" / "enwiki" / "20240101" / f.name) == _sha1(run / f.name)
    assert not list((tmp_path / "store" / "downloads").rglob("*.part"))

    before = len(mirror.requests)
    assert download_dump(ref, store, UA, progress=False) == urls
    assert len(mirror.requests) == before  # nothing fetched again


def test_resume_after_the_server_cuts_the_transfer(mirror, tmp_path):
    pages = sample_pages(40, words=400)
    mirror.add_run("enwiki", "20240101", pages)
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    data = ref.files[0]
    half = data.size // 2
    mirror.cut_next(data.name, half)
    store = IndexStore(str(tmp_path / "store"))

    download_dump(ref, store, UA, progress=False, backoff_s=0.01)

    gets = mirror.gets(data.name)
    assert [g["range"] for g in gets] == [None, f"bytes={half}-"]
    local = tmp_path / "store" / "downloads" / "enwiki" / "20240101" / data.name
    assert _sha1(local) == data.sha1


def test_resume_across_runs(mirror, tmp_path):
    mirror.add_run("enwiki", "20240101", sample_pages(40, words=400))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    data = ref.files[0]
    store = IndexStore(str(tmp_path / "store"))
    mirror.cut_next(data.name, 1000)
    with pytest.raises(DownloadError, match="rerun to resume"):
        download_dump(ref, store, UA, retries=0, progress=False)
    final = tmp_path / "store" / "downloads" / "enwiki" / "20240101" / data.name
    assert not final.exists()  # nothing half-written under the final name

    download_dump(ref, store, UA, retries=0, progress=False)

    assert mirror.gets(data.name)[-1]["range"] == "bytes=1000-"
    assert _sha1(final) == data.sha1


def test_retries_server_errors_with_backoff(mirror, tmp_path):
    mirror.add_run("enwiki", "20240101", sample_pages(3))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    mirror.fail_next(ref.files[0].name, 503, 502)
    download_dump(ref, IndexStore(str(tmp_path / "s")), UA, progress=False, backoff_s=0.01)
    assert len(mirror.gets(ref.files[0].name)) == 3


def test_sha1_mismatch_is_rejected_and_nothing_is_kept(mirror, tmp_path):
    run = mirror.add_run("enwiki", "20240101", sample_pages(3))
    status = json.loads((run / "dumpstatus.json").read_text())
    files = status["jobs"]["articlesmultistreamdump"]["files"]
    name = next(iter(files))
    files[name]["sha1"] = "0" * 40
    (run / "dumpstatus.json").write_text(json.dumps(status))
    store = IndexStore(str(tmp_path / "store"))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)

    with pytest.raises(Rejected, match=f"sha1 mismatch for {name}"):
        download_dump(ref, store, UA, progress=False)

    left = [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert left == []


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "sub/dir.bz2", "a..b.bz2", "bad name.bz2"])
def test_hostile_file_names_are_refused(mirror, hostile):
    run = mirror.add_run("enwiki", "20240101", sample_pages(2))
    status = json.loads((run / "dumpstatus.json").read_text())
    status["jobs"]["articlesmultistreamdump"]["files"][hostile] = {"size": 1, "sha1": "0" * 40}
    (run / "dumpstatus.json").write_text(json.dumps(status))
    with pytest.raises(InvalidName, match="refusing file name"):
        resolve_dump("enwiki", "20240101", mirror.url, UA)
    assert not mirror.gets(hostile.rsplit("/", 1)[-1])


def test_resolve_source_layouts(tmp_path, gensim_excerpt):
    run = make_dump(tmp_path / "mirror", "enwiki", "20240101", sample_pages(3), parts=2)
    make_dump(tmp_path / "mirror", "enwiki", "20231201", sample_pages(3))

    by_run = resolve_source(str(run))
    by_root = resolve_source(f"file://{tmp_path / 'mirror'}")  # newest finished run under <dir>/<wiki>/
    assert (by_run.wiki, by_run.dump_date) == (by_root.wiki, by_root.dump_date) == ("enwiki", "20240101")
    assert [f.name for f in by_run.files] == [f.name for f in by_root.files]
    assert all(f.sha1 for f in by_run.files)

    one = resolve_source(str(run / by_run.files[0].name))  # a single file brings its index along
    assert [f.name for f in one.files] == [by_run.files[0].name, by_run.files[2].name]
    assert one.dump_date == "20240101"

    # `enwiki-latest-...` names no date and a siteinfo holds none: the newest revision in the file dates it.
    excerpt = resolve_source(str(gensim_excerpt))
    assert (excerpt.wiki, excerpt.dump_date) == ("enwiki", "20160501")
    assert resolve_source(str(gensim_excerpt), date="20160502").dump_date == "20160502"
    assert download_dump(excerpt, IndexStore(str(tmp_path / "s")), UA, progress=False) == [str(gensim_excerpt)]

    with pytest.raises(NotFound, match="dump source not found"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no dump files"):
        resolve_source(str(tmp_path / "empty"))


def test_local_source_sha1_is_verified(tmp_path):
    run = make_dump(tmp_path, "enwiki", "20240101", sample_pages(3))
    ref = resolve_source(str(run))
    data = run / ref.files[0].name
    data.write_bytes(data.read_bytes()[:-1] + b"\0")  # same size, different content
    set_status(run, "articlesmultistreamdump", "done")  # size/sha1 of the new content...
    ref_ok = resolve_source(str(run))
    assert download_dump(ref_ok, IndexStore(str(tmp_path / "s")), UA, progress=False)[0].endswith(data.name)
    ref.files[0].size = data.stat().st_size  # ...versus the stale sha1 recorded before
    with pytest.raises(Rejected, match="sha1 mismatch"):
        download_dump(ref, IndexStore(str(tmp_path / "s")), UA, progress=False)


def test_download_into_local_and_s3_store(mirror, store):
    """The `store` fixture runs this once on disk and once on a moto S3 server."""
    run = mirror.add_run("enwiki", "20240101", sample_pages(30, words=300))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    mirror.cut_next(ref.files[0].name, ref.files[0].size // 3)

    urls = download_dump(ref, store, UA, progress=False, backoff_s=0.01)

    assert mirror.gets(ref.files[0].name)[-1]["range"] == f"bytes={ref.files[0].size // 3}-"
    for f, url in zip(ref.files, urls, strict=True):
        with store.fs.open(store.downloads_path("enwiki", "20240101", f.name), "rb") as got:
            assert hashlib.sha1(got.read()).hexdigest() == _sha1(run / f.name)
        assert url.endswith(f"downloads/enwiki/20240101/{f.name}")
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.downloads_path("enwiki", "20240101"))) == \
        sorted(f.name for f in ref.files)


def test_undated_local_files_are_dated_by_their_newest_revision(tmp_path):
    """A local dump whose names carry no date is dated by the newest revision of all its files (a chunk
    boundary may cut a timestamp), by --date when given, and UNDATED only when it holds no revision."""
    folder = tmp_path / "dump"
    folder.mkdir()
    older = dump_xml("frwiki", sample_pages(2)).replace("2024-01-01T", "2023-05-06T")
    newer = dump_xml("frwiki", sample_pages(2, start_id=50)).replace("2024-01-01T", "2024-03-09T", 1)
    (folder / "frwiki-latest-pages-articles1.xml").write_text(older)
    pad = (4 << 20) - 5 - newer.index("<timestamp>2024-03-09")  # the 4 MiB read cuts that timestamp in two
    (folder / "frwiki-latest-pages-articles2.xml.bz2").write_bytes(bz2.compress(("x" * pad + newer).encode()))
    assert resolve_source(str(folder)).dump_date == "20240309"
    assert resolve_source(str(folder / "frwiki-latest-pages-articles1.xml")).dump_date == "20230506"
    assert resolve_source(str(folder), date="20240310").dump_date == "20240310"

    empty = tmp_path / "frwiki-latest-pages-articles.xml"
    empty.write_text(dump_xml("frwiki", []))
    assert resolve_source(str(empty)).dump_date == UNDATED

    dated = tmp_path / "frwiki-20240101-pages-articles.xml"
    dated.write_text(dump_xml("frwiki", sample_pages(1)))
    with pytest.raises(Rejected, match="is the dump of 20240101, not of --date 20240102"):
        resolve_source(str(dated), date="20240102")


def test_a_dump_file_republished_with_a_new_sha1_is_fetched_again(mirror, store):
    """Same size, new bytes, new sha1 in dumpstatus.json: the stored copy no longer counts as verified."""
    run = mirror.add_run("enwiki", "20240101", sample_pages(3))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    download_dump(ref, store, UA, progress=False)
    data = run / ref.files[0].name
    bad = bytearray(data.read_bytes())
    bad[len(bad) // 2] ^= 0xFF  # the mirror's corrected file: same size, another sha1
    data.write_bytes(bytes(bad))
    set_status(run, "articlesmultistreamdump", "done")
    again = resolve_dump("enwiki", "20240101", mirror.url, UA)
    assert again.files[0].sha1 != ref.files[0].sha1 and again.files[0].size == ref.files[0].size

    download_dump(again, store, UA, progress=False)

    assert len(mirror.gets(data.name)) == 2 and len(mirror.gets(ref.files[1].name)) == 1
    with store.fs.open(store.downloads_path("enwiki", "20240101", data.name), "rb") as got:
        assert hashlib.sha1(got.read()).hexdigest() == again.files[0].sha1


def test_s3_downloads_resume_in_a_private_scratch_and_never_write_through_a_symlink(mirror, s3_bucket, moto_server,
                                                                                   tmp_path, monkeypatch):
    shared = tmp_path / "tmp"  # stands for the shared /tmp: any local user may write here
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    mirror.add_run("enwiki", "20240101", sample_pages(30, words=300))
    ref = resolve_dump("enwiki", "20240101", mirror.url, UA)
    victim = tmp_path / "victim"
    victim.write_bytes(b"a file the worker can write")
    planted = shared / "ragindex-downloads" / "enwiki" / "20240101"  # the old predictable path
    planted.mkdir(parents=True)
    for f in ref.files:
        (planted / f".{f.name}.part").symlink_to(victim)
    scratch = shared / f"ragindex-{os.getuid()}" / "downloads"
    stale = scratch / "enwiki" / "20230101" / ".enwiki-20230101-pages-articles.xml.bz2.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed run")
    os.utime(stale, (time.time() - 8 * 86400,) * 2)
    store = IndexStore(f"s3://{s3_bucket}/store", s3_endpoint_url=moto_server)
    cut = ref.files[0].size // 3
    mirror.cut_next(ref.files[0].name, cut)

    download_dump(ref, store, UA, progress=False, backoff_s=0.01)

    assert victim.read_bytes() == b"a file the worker can write"
    assert mirror.gets(ref.files[0].name)[-1]["range"] == f"bytes={cut}-"  # resumed from the private scratch
    for d in (scratch.parent, scratch, scratch / "enwiki", scratch / "enwiki" / "20240101"):
        assert stat.S_IMODE(d.lstat().st_mode) == 0o700 and not d.is_symlink()
    assert not stale.exists() and not stale.parent.exists()  # cleaned by the next run
    assert [p for p in scratch.rglob("*") if p.is_file()] == []  # uploaded: nothing left behind
    with store.fs.open(store.downloads_path("enwiki", "20240101", ref.files[0].name), "rb") as got:
        assert hashlib.sha1(got.read()).hexdigest() == ref.files[0].sha1

    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    shutil.rmtree(scratch.parent)
    scratch.parent.symlink_to(elsewhere)  # a scratch root planted as a symlink is refused, not followed
    with pytest.raises(RagindexError, match="not a plain directory") as exc:
        download_dump(resolve_dump("enwiki", "20240101", mirror.url, UA), IndexStore(
            f"s3://{s3_bucket}/other", s3_endpoint_url=moto_server), UA, progress=False)
    assert "\n" not in str(exc.value) and list(elsewhere.iterdir()) == []
