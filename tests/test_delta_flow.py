"""End to end: full -> delta -> delta -> rollback -> full rebuild that reconciles, through the refresh-index
and rollback-index flows on a real temporary Prefect server, reading a loopback mirror of real enwiki
articles (the gensim excerpt) and its adds-changes days, on local disk and on the moto S3 server."""

from __future__ import annotations

import numpy as np
import pytest

from flows.refresh import refresh_index
from flows.rollback import rollback_index
from flows.settings import load_settings
from rag_model.index import VersionIndex
from storage.location import Location
from storage.store import IndexStore
from tasks.parse import iter_pages
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import make_incr_day
from tests.fixtures.mirror import Page

ADDED = "In 2024 a delta version of the index learned this sentence about the quick brown fox ."


def _articles(excerpt, n: int = 16) -> list[Page]:
    pages = []
    for page in iter_pages(Location(excerpt)):
        if page.ns == 0 and not page.redirect and len(page.text) > 3000 and "may refer to" not in page.text:
            pages.append(Page(page.page_id, page.title, page.text[:6000], rev_id=page.rev_id))
        if len(pages) == n:
            return pages
    raise AssertionError("the excerpt has too few articles")


def _served(store: IndexStore, version: str) -> dict[str, tuple[str, str]]:
    """passage_id -> (title, text) of every row the version serves, read through serving's own index."""
    index = VersionIndex.open(store, version)
    live = [s.first_row_id + i for s in index.segments for i in range(s.rows) if not s.is_dropped(np.array([i]))[0]]
    rows = index.rows(live)
    assert len(rows) == index.size == store.manifest(version).live_passages
    served = {r["passage_id"]: (r["title"], r["text"]) for r in rows}
    assert len(served) == len(rows)  # no passage served twice
    return served


def _finds_itself(store: IndexStore, version: str, passage_id: str) -> bool:
    index = VersionIndex.open(store, version, with_embeddings=True)
    live = {index.rows([s.first_row_id + i])[0]["passage_id"]: s.first_row_id + i
            for s in index.segments for i in range(s.rows) if not s.is_dropped(np.array([i]))[0]}
    vector = index.embeddings(np.array([live[passage_id]]))
    return index.search(vector, 1)[0][0].passage_id == passage_id


@pytest.mark.parametrize("store_backend", ["local", "s3"], indirect=True)
def test_full_delta_delta_rollback_full(prefect_api, mirror, tiny_dpr, gensim_excerpt, store_url, s3_endpoint,
                                        monkeypatch, request):
    if s3_endpoint:
        monkeypatch.setenv("RAGINDEX_S3_ENDPOINT_URL", s3_endpoint)
    load_settings.cache_clear()  # settings are read once at the edge: this run's must see the endpoint
    request.addfinalizer(load_settings.cache_clear)
    store = IndexStore(store_url, s3_endpoint_url=s3_endpoint)
    common = dict(wiki="enwiki", mirror=mirror.url, store_url=store_url, encoder=str(tiny_dpr.ctx_dir),
                  encoder_kind="dpr", index_spec="flat", shard_rows=50, allow_count_change=True)
    pages = _articles(gensim_excerpt)
    edited, twice, redirected, moved, deleted = pages[:5]
    rev = max(p.revision for p in pages) + 1

    mirror.add_run("enwiki", "20240101", pages)
    full = refresh_index(**common)
    assert full["status"] == "promoted" and full["mode"] == "full"
    base = _served(store, full["version"])

    # Day 1: an edit, a page edited twice, a redirect, a move, a new article and a talk-page edit.
    new_text = pages[5].text.replace(pages[5].title, "Fox")
    day1 = [
        HistPage(edited.page_id, edited.title, [(rev + 1, edited.text + "\n\n" + ADDED)]),
        HistPage(twice.page_id, twice.title, [(rev + 2, "a first draft"), (rev + 3, twice.text + " Second edit.")]),
        HistPage(redirected.page_id, redirected.title, [(rev + 4, f"#REDIRECT [[{edited.title}]]")],
                 redirect=edited.title),
        HistPage(moved.page_id, moved.title + " (renamed)", [(rev + 5, moved.text)]),
        HistPage(990001, "Fox (new article)", [(rev + 6, new_text)]),
        HistPage(990002, f"Talk:{edited.title}", [(rev + 7, "Talk words " * 50)], ns=1),
    ]
    make_incr_day(mirror.root, "enwiki", "20240102", history_xml("enwiki", day1), maxrevid=rev + 7)
    first = refresh_index(**common)
    assert first["status"] == "promoted" and first["mode"] == "delta"
    d1 = store.manifest(first["version"])
    assert d1.parent == full["version"] and [s.version for s in d1.segments] == [full["version"]]
    assert [d.date for d in d1.lineage.days] == ["20240102"] and d1.lineage.base_version == full["version"]
    changes = first["changes"]
    assert [t for _, t in changes["added"]] == ["Fox (new article)"]
    assert sorted(p for p, _ in changes["changed"]) == sorted([edited.page_id, twice.page_id])
    assert [p for p, _ in changes["moved"]] == [moved.page_id]
    assert [p for p, _ in changes["redirected"]] == [redirected.page_id]
    assert changes["ignored_namespace"] == 1
    served1 = _served(store, d1.version)
    titles = {t for t, _ in served1.values()}
    assert redirected.title not in titles and moved.title not in titles and f"Talk:{edited.title}" not in titles
    assert moved.title + " (renamed)" in titles and "Fox (new article)" in titles
    assert any(ADDED.split()[3] in text for t, text in served1.values() if t == edited.title)
    assert not any("a first draft" in text for _, text in served1.values())
    unchanged = {k: v for k, v in base.items() if int(k.split("_")[0]) not in {p.page_id for p in pages[:4]}}
    assert unchanged.items() <= served1.items()  # untouched pages are served as they were
    # The delta wrote only the changed pages' rows: it shares the base's files instead of copying them.
    assert d1.counts["passages"] < len(base) // 2 and store.version_bytes(d1.version) < \
        store.version_bytes(full["version"]) // 2
    own_edit = next(k for k, (t, text) in served1.items() if t == edited.title and ADDED.split()[3] in text)
    assert _finds_itself(store, d1.version, own_edit)

    # Day 2 is missing, day 3 is done, day 4 is still running, day 5 is done: only day 3 is applied.
    day3 = [HistPage(edited.page_id, edited.title, [(rev + 10, edited.text + "\n\nDay three rewrote the end .")])]
    make_incr_day(mirror.root, "enwiki", "20240104", history_xml("enwiki", day3), maxrevid=rev + 10)
    day4 = [HistPage(twice.page_id, twice.title, [(rev + 11, twice.text + " Fourth day.")])]
    make_incr_day(mirror.root, "enwiki", "20240105", history_xml("enwiki", day4), maxrevid=rev + 11,
                  status="in-progress", corrupt_md5=True)
    day5 = [HistPage(twice.page_id, twice.title, [(rev + 12, twice.text + " Fifth day.")])]
    make_incr_day(mirror.root, "enwiki", "20240106", history_xml("enwiki", day5), maxrevid=rev + 12)
    second = refresh_index(**common)
    assert second["status"] == "promoted" and "20240105" in second["reason"]
    d2 = store.manifest(second["version"])
    assert [d.date for d in d2.lineage.days] == ["20240102", "20240104"]
    assert [s.version for s in d2.segments] == [full["version"], d1.version]
    served2 = _served(store, d2.version)
    assert not any(ADDED.split()[3] in text for t, text in served2.values() if t == edited.title)
    assert not any("Fourth day" in text or "Fifth day" in text for _, text in served2.values())

    # Nothing new is finished: up to date, nothing built.
    versions = [m.version for m in store.list_versions()]
    idle = refresh_index(**common)
    assert idle["status"] == "up-to-date" and [m.version for m in store.list_versions()] == versions

    # Day 4 finishes, but its file does not match its md5: the night fails in one line, nothing changes.
    (mirror.root / "other/incr/enwiki/20240105/status.txt").write_text("done:all\n")
    with pytest.raises(Exception, match="md5 mismatch") as failed:
        refresh_index(**common)
    assert "\n" not in str(failed.value).strip()
    assert [m.version for m in store.list_versions()] == versions and store.current().version == d2.version

    back = rollback_index(store_url=store_url)
    assert back["version"] == d1.version and store.current().version == d1.version
    assert _served(store, d1.version) == served1

    # A newer full dump of the end state, without one page the deltas never saw deleted: a full build,
    # which reuses every vector and counts the deletion it reconciles (once the operator lifts the
    # rollback's hold: while it is active nothing is promoted).
    latest = {edited.page_id: (edited.title, day3[0].revisions[-1][1]),
              twice.page_id: (twice.title, twice.text + " Second edit."),
              moved.page_id: (moved.title + " (renamed)", moved.text), 990001: ("Fox (new article)", new_text)}
    end_state = [Page(p.page_id, *latest.get(p.page_id, (p.title, p.text)), rev_id=rev + 20)
                 for p in [*pages, Page(990001, "", "")] if p.page_id not in {redirected.page_id, deleted.page_id}]
    mirror.add_run("enwiki", "20240201", end_state)
    rebuilt = refresh_index(**common, resume=True)
    assert rebuilt["status"] == "promoted" and rebuilt["mode"] == "full"
    m = store.manifest(rebuilt["version"])
    assert not m.is_delta and m.counts["deletions_reconciled"] == 1
    assert rebuilt["counts"]["encoded"] == 0  # every vector came from the lineage, segments included
    deleted_rows = {k for k in served2 if int(k.split("_")[0]) == deleted.page_id}
    assert deleted_rows and _served(store, rebuilt["version"]) == \
        {k: v for k, v in served2.items() if k not in deleted_rows}


def test_a_failed_delta_names_its_step_in_the_report_and_the_cli(prefect_api, mirror, tiny_dpr, gensim_excerpt,
                                                                 tmp_path, capsys):
    """A delta whose parent's passage table no longer matches its manifest fails in the step that reads it;
    the one-line error and the run report (on the run the user started) both name that step."""
    import httpx

    from cli.main import main

    store_url = str(tmp_path / "store")
    store = IndexStore(store_url)
    common = dict(wiki="enwiki", mirror=mirror.url, store_url=store_url, encoder=str(tiny_dpr.ctx_dir),
                  encoder_kind="dpr", index_spec="flat", shard_rows=50, allow_count_change=True)
    pages = _articles(gensim_excerpt, n=6)
    mirror.add_run("enwiki", "20240101", pages)
    full = refresh_index(**common)
    edited = pages[0]
    day = [HistPage(edited.page_id, edited.title, [(edited.revision + 100, edited.text + "\n\n" + ADDED)])]
    make_incr_day(mirror.root, "enwiki", "20240102", history_xml("enwiki", day), maxrevid=edited.revision + 100)
    table = store.version_path(full["version"], "passages.arrow")
    with open(table, "r+b") as f:  # same size, one byte changed: only its sha256 tells
        f.seek(-20, 2)
        byte = f.read(1)
        f.seek(-20, 2)
        f.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(SystemExit) as exit_info:
        main(["refresh", "--incremental", "--wiki", "enwiki", "--mirror", mirror.url, "--store", store_url,
              "--encoder", str(tiny_dpr.ctx_dir), "--encoder-kind", "dpr", "--index-spec", "flat"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0
    assert "failed in step 'parent_pages'" in err[-1] and "passages.arrow" in err[-1]
    assert store.current().version == full["version"] and len(store.list_versions()) == 1

    wanted = {"limit": 5, "sort": "CREATED_DESC", "artifacts": {"key": {"any_": ["refresh-index-report"]}}}
    reports = httpx.post(f"{prefect_api}/artifacts/filter", json=wanted)
    report = reports.json()[0]
    assert "refresh-index: failed" in report["data"] and "`parent_pages`" in report["data"]
    run = httpx.get(f"{prefect_api}/flow_runs/{report['flow_run_id']}").json()
    assert httpx.get(f"{prefect_api}/flows/{run['flow_id']}").json()["name"] == "refresh-index"
