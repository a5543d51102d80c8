"""Dump -> passage shards: the contract, skip reasons, determinism across workers, bad input."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.layout import PASSAGE_SCHEMA
from storage.location import Location
from storage.manifest import SourceDump
from tasks.clean import CleanOptions
from tasks.download import resolve_source
from tasks.parse import DumpError
from tasks.passages import assemble, plan_units, run_unit, unit_output_intact, write_passages
from tests.fixtures.mirror import Page, make_dump, sample_pages

SOURCE = SourceDump(wiki="enwiki", dump_date="20240101")


def _mixed_pages() -> list[Page]:
    pages = sample_pages(12, start_id=100)
    pages[1] = Page(101, "Old name", "#REDIRECT [[Article 100]]", redirect="Article 100")
    pages[3] = Page(103, "Talk:Article 100", "Discussion words here", ns=1)
    pages[5] = Page(105, "Mercury (disambiguation)", "'''Mercury''' may refer to:\n* [[Mercury (planet)]]")
    pages[7] = Page(107, "Only markup", "{{Infobox}}\n[[Category:Empty]]")
    pages[9] = Page(109, "Module:Data", "return {}", model="Scribunto")
    pages[10] = Page(110, "Lead", "'''Lead''' is a [[chemical element]].<ref>cite</ref>\n== See also ==\n* [[Tin]]")
    return pages


def _table(out) -> list[dict]:
    summary = json.loads((out / "passages.json").read_text())
    rows = []
    for shard in summary["shards"]:
        rows += pq.read_table(out / shard["name"]).to_pylist()
    return rows


def test_shards_and_summary_follow_the_contract(tmp_path):
    pages = _mixed_pages()
    run = make_dump(tmp_path / "m", "enwiki", "20240101", pages, parts=2)
    ref = resolve_source(str(run))
    out = tmp_path / "out"

    summary = write_passages([Location(f.url) for f in ref.files], Location(out), ref.source(), workers=1, shard_rows=7,
                             progress=False)

    assert json.loads((out / "passages.json").read_text()) == summary
    assert summary["source"]["wiki"] == "enwiki" and summary["source"]["files"][0]["sha1"]
    assert summary["articles"] == {"seen": 12, "kept": 7, "skipped": {
        "disambiguation": 1, "empty": 1, "namespace": 1, "not_wikitext": 1, "redirect": 1}}
    names = sorted(p.name for p in out.iterdir())
    assert names == [s["name"] for s in summary["shards"]] + ["passages.json"]  # no work dir left behind
    for shard in summary["shards"]:
        table = pq.read_table(out / shard["name"])
        assert table.schema.remove_metadata() == PASSAGE_SCHEMA
        assert table.num_rows == shard["rows"] <= 7
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
        assert pq.ParquetFile(out / shard["name"]).metadata.row_group(0).column(0).compression == "ZSTD"

    rows = _table(out)
    assert [r["row_id"] for r in rows] == list(range(summary["passages"]))
    assert len({r["passage_id"] for r in rows}) == len(rows)
    kept_ids = [p.page_id for p in pages if p.page_id not in (101, 103, 105, 107, 109)]
    assert list(dict.fromkeys(r["page_id"] for r in rows)) == kept_ids  # dump order
    by_page = {p.page_id: p for p in pages}
    for page_id in (p for p in kept_ids if p != 110):
        words = [w for r in rows if r["page_id"] == page_id for w in r["text"].split()]
        assert words == by_page[page_id].text.split()  # nothing lost or duplicated end to end
    lead = [r for r in rows if r["page_id"] == 110]
    assert [r["text"] for r in lead] == ["Lead is a chemical element."]
    assert lead[0]["rev_id"] == 110 * 100 + 7 and lead[0]["passage_id"] == "110_0"
    assert summary["words"] == sum(len(r["text"].split()) for r in rows)
    assert {"parse_clean_chunk_s", "assemble_s", "total_s"} <= set(summary["timings"])


def _ids_for(files: list[Location], workers: int, work, out) -> list[tuple]:
    units = plan_units(files, workers, min_unit_bytes=0)
    results = [run_unit(u, Location(work)) for u in units]
    assemble(results, Location(out), SOURCE, shard_rows=5)
    return [(r["row_id"], r["passage_id"], r["content_hash"]) for r in _table(out)], len(units)


@pytest.fixture(scope="module")
def dump_files(tmp_path_factory):
    run = make_dump(tmp_path_factory.mktemp("det"), "enwiki", "20240101", sample_pages(16, words=90), parts=2,
                    pages_per_stream=1)
    return [Location(p) for p in sorted(run.glob("*.bz2"))]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.integers(min_value=1, max_value=8))
def test_ids_are_stable_across_worker_counts(dump_files, tmp_path_factory, workers):
    base = tmp_path_factory.mktemp("base")
    reference, one_unit_each = _ids_for(dump_files, 1, base / "w", base / "o")
    other = tmp_path_factory.mktemp("other")
    ids, n_units = _ids_for(dump_files, workers, other / "w", other / "o")
    assert ids == reference
    assert n_units >= min(4 * workers, 16) // 2  # the cut really changes with the worker count


def test_process_pool_matches_single_worker(dump_files, tmp_path):
    one = write_passages(dump_files, Location(tmp_path / "one"), SOURCE, workers=1, progress=False, min_unit_bytes=0)
    two = write_passages(dump_files, Location(tmp_path / "two"), SOURCE, workers=2, progress=False, min_unit_bytes=0)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["articles"] == two["articles"] and one["passages"] == two["passages"] > 0


def test_unit_is_reused_when_done(dump_files, tmp_path):
    unit = plan_units(dump_files, 1)[0]
    first = run_unit(unit, Location(tmp_path))
    parquet = tmp_path / "unit-000000.parquet"
    mtime = parquet.stat().st_mtime_ns
    assert run_unit(unit, Location(tmp_path)) == first
    assert parquet.stat().st_mtime_ns == mtime


def test_unit_whose_output_changed_is_redone_not_reused(dump_files, tmp_path):
    unit = plan_units(dump_files, 1)[0]
    first = run_unit(unit, Location(tmp_path))
    parquet = tmp_path / "unit-000000.parquet"
    good = parquet.read_bytes()
    parquet.write_bytes(good[:-8] + b"\0" * 8)  # same size, other bytes: its record no longer describes it
    assert unit_output_intact(first, Location(tmp_path)) is False
    again = run_unit(unit, Location(tmp_path))
    assert parquet.read_bytes() == good and unit_output_intact(again, Location(tmp_path))
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    parquet.unlink()
    assert unit_output_intact(first, Location(tmp_path)) is False


def test_rerun_replaces_stale_shards(dump_files, tmp_path):
    out = tmp_path / "out"
    many = write_passages(dump_files, Location(out), SOURCE, workers=1, shard_rows=2, progress=False)
    few = write_passages(dump_files, Location(out), SOURCE, workers=1, shard_rows=1000, progress=False)
    assert len(many["shards"]) > 1 and len(few["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "passages.json"]


def test_dump_without_articles_is_an_error_and_writes_nothing(tmp_path):
    pages = [Page(1, "A", "#REDIRECT [[B]]", redirect="B"), Page(2, "Talk:B", "words", ns=1)]
    run = make_dump(tmp_path / "m", "enwiki", "20240101", pages)
    out = tmp_path / "out"
    with pytest.raises(DumpError, match=r"no articles in enwiki-20240101-pages-articles-multistream.xml.bz2: "
                                        r"2 pages seen, skipped: namespace=1, redirect=1"):
        write_passages([Location(p) for p in run.glob("*.bz2")], Location(out), SOURCE, workers=1, progress=False)
    assert not (out / "passages.json").exists() and not list(out.glob("part-*"))


def test_corrupt_input_fails_and_leaves_no_summary(tmp_path):
    run = make_dump(tmp_path / "m", "enwiki", "20240101", sample_pages(30, words=200))
    data = next(run.glob("*multistream.xml.bz2"))
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) * 2 // 3])
    out = tmp_path / "out"
    with pytest.raises(DumpError, match=rf"truncated bz2 data in {data.name} near byte \d+"):
        write_passages([Location(data)], Location(out), SOURCE, workers=1, progress=False)
    assert not (out / "passages.json").exists() and not list(out.glob("part-*"))

    # The failed unit had a page in flight in this thread's cleaner; the next run must not see its reply.
    good = make_dump(tmp_path / "g", "enwiki", "20240101", sample_pages(3, start_id=500))
    write_passages([Location(p) for p in good.glob("*.bz2")], Location(tmp_path / "good"), SOURCE, workers=1,
                   progress=False)
    rows = _table(tmp_path / "good")
    assert [w for r in rows if r["page_id"] == 500 for w in r["text"].split()] == sample_pages(1, 500)[0].text.split()


def test_slow_or_huge_page_is_skipped_and_the_run_goes_on(tmp_path):
    pages = sample_pages(5)
    pages[1] = Page(11, "Slow", "<b>x</b> " * 50_000)  # seconds of parsing
    pages[3] = Page(13, "Huge", "word " * 120_000)
    run = make_dump(tmp_path / "m", "enwiki", "20240101", pages, pages_per_stream=5)
    options = CleanOptions(max_page_chars=500_000, page_timeout_s=0.3)
    summary = write_passages([Location(p) for p in run.glob("*.bz2")], Location(tmp_path / "out"), SOURCE, workers=1,
                             progress=False, options=options)
    assert summary["articles"] == {"seen": 5, "kept": 3, "skipped": {"timeout": 1, "too_large": 1}}
    assert [r["page_id"] for r in _table(tmp_path / "out") if r["passage_id"].endswith("_0")] == [10, 12, 14]


def test_gensim_excerpt_end_to_end(gensim_excerpt, tmp_path):
    ref = resolve_source(str(gensim_excerpt))
    summary = write_passages([Location(f.url) for f in ref.files], Location(tmp_path / "out"), ref.source(), workers=1,
                             progress=False)
    articles = summary["articles"]
    assert articles["seen"] == 206 and articles["skipped"]["redirect"] > 50
    assert articles["kept"] + sum(articles["skipped"].values()) == articles["seen"]
    assert summary["passages"] > 1000 and summary["source"]["dump_date"] == "20160501"
    first = pq.read_table(tmp_path / "out" / "part-00000.parquet").slice(0, 1).to_pylist()[0]
    assert (first["row_id"], first["passage_id"], first["title"]) == (0, "12_0", "Anarchism")
    assert len(first["text"].split()) == 100


def test_s3_source_and_output(tmp_path, s3_bucket, moto_server):
    """A mirror-like dump dir on S3 is read in place (by byte ranges) and the shards land on S3."""
    from storage.fs import resolve

    run = make_dump(tmp_path / "m", "enwiki", "20240101", sample_pages(10, words=120), pages_per_stream=1)
    fs, _ = resolve(f"s3://{s3_bucket}", moto_server)
    for path in run.iterdir():
        fs.put_file(str(path), f"{s3_bucket}/dumps/enwiki/20240101/{path.name}")

    ref = resolve_source(f"s3://{s3_bucket}/dumps/enwiki/20240101", moto_server)
    assert (ref.wiki, ref.dump_date) == ("enwiki", "20240101") and all(f.sha1 for f in ref.files)
    files = [Location(f.url, moto_server) for f in ref.files]
    assert len(plan_units(files, 4, min_unit_bytes=0)) > 1
    out = Location(f"s3://{s3_bucket}/passages", moto_server)
    summary = write_passages(files, out, ref.source(), workers=1, progress=False, min_unit_bytes=0)

    local = write_passages([Location(p) for p in sorted(run.glob("*.bz2"))], Location(tmp_path / "local"),
                           ref.source(), workers=1, progress=False)
    assert [s["sha256"] for s in summary["shards"]] == [s["sha256"] for s in local["shards"]]
    with fs.open(f"{s3_bucket}/passages/passages.json", "rb") as f:
        assert json.loads(f.read()) == summary
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/passages")) == \
        ["part-00000.parquet", "passages.json"]
