"""A rollback holds, and a refresh never goes backwards (issue #22 items 2 and 3), as an operator meets them:
the refresh-index and rollback-index flows on a real temporary Prefect server, the `ragindex` command line, a
loopback mirror with its adds-changes days, a tiny real DPR encoder."""

from __future__ import annotations

import json

import httpx
import pytest

from cli.main import main
from flows import refresh_delta
from flows.refresh import refresh_index
from flows.rollback import rollback_index
from storage.errors import Conflict
from storage.store import IndexStore
from tasks.promote import rollback_version
from tests.fixtures.history import HistPage, history_xml
from tests.fixtures.incr_mirror import make_incr_day
from tests.fixtures.mirror import Page, make_dump, sample_pages

PAGES = sample_pages(6)


@pytest.fixture
def nightly(prefect_api, mirror, tiny_dpr, tmp_path):
    """The nightly's parameters against a fresh store, whose mirror has the full dump of 20240101."""
    mirror.add_run("enwiki", "20240101", PAGES)
    return dict(wiki="enwiki", mirror=mirror.url, store_url=str(tmp_path / "store"), encoder=str(tiny_dpr.ctx_dir),
                encoder_kind="dpr", index_spec="flat", shard_rows=50, allow_count_change=True)


def _day(mirror, date: str, n: int) -> None:
    """An adds-changes day that edits page `n` (its maxrevid, 100000 + n, tells the days apart)."""
    page = PAGES[n]
    edit = HistPage(page.page_id, page.title, [(100_000 + n, f"{page.text} edited on {date} words{n}")])
    make_incr_day(mirror.root, "enwiki", date, history_xml("enwiki", [edit]), maxrevid=100_000 + n)


def _cli(capsys, *args: str) -> str:
    main(list(args))
    return capsys.readouterr().out


def _versions(store: IndexStore) -> list[str]:
    return [m.version for m in store.list_versions()]


def test_a_rollback_holds_over_the_next_nightlies_until_resume(nightly, mirror, capsys, prefect_api):
    store = IndexStore(nightly["store_url"])
    full = refresh_index(**nightly)
    _day(mirror, "20240102", 0)
    first = refresh_index(**nightly)
    _day(mirror, "20240104", 1)
    second = refresh_index(**nightly)
    assert [full["status"], first["status"], second["status"]] == ["promoted"] * 3
    assert store.manifest(second["version"]).parent == first["version"]

    out = _cli(capsys, "rollback", full["version"], "--store", nightly["store_url"], "--reason", "a wrong fact")
    assert f"hold 4: rolled back from {second['version']}" in out and "until `ragindex resume`" in out
    built = _versions(store)

    # The same days on the same base are the content rolled back from: not built again, not promoted.
    held = refresh_index(**nightly)
    assert held["status"] == "held" and held["version"] == second["version"]
    assert "is the content rolled back from" in held["reason"] and "a wrong fact" in held["reason"]
    assert store.current().version == full["version"] and store.current().generation == 4
    assert _versions(store) == built
    wanted = {"limit": 1, "sort": "CREATED_DESC", "artifacts": {"key": {"any_": ["refresh-index-report"]}}}
    report = httpx.post(f"{prefect_api}/artifacts/filter", json=wanted).json()[0]["data"]
    assert "refresh-index: held" in report and "## Rollback holds" in report and "hold 4:" in report

    [hold] = json.loads(_cli(capsys, "versions", "--store", nightly["store_url"], "--json"))["holds"]
    assert (hold["left"], hold["to"], hold["generation"]) == (second["version"], full["version"], 4)
    assert [d["date"] for d in hold["lineage"]["days"]] == ["20240102", "20240104"]

    assert "released hold 4" in _cli(capsys, "resume", "--store", nightly["store_url"])
    resumed = refresh_index(**nightly)
    assert resumed["status"] == "promoted" and resumed["version"] == second["version"]
    assert store.current().version == second["version"] and _versions(store) == built


def test_a_rollback_while_the_nightly_builds_wins_the_race(nightly, mirror, monkeypatch):
    store = IndexStore(nightly["store_url"])
    full = refresh_index(**nightly)
    _day(mirror, "20240102", 0)
    first = refresh_index(**nightly)
    _day(mirror, "20240104", 1)
    build = refresh_delta.build_delta_version

    def build_then_an_operator_rolls_back(*args, **kwargs):
        manifest = build(*args, **kwargs)
        rollback_version(IndexStore(nightly["store_url"]), actor="operator", reason="while the nightly built")
        return manifest

    monkeypatch.setattr(refresh_delta, "build_delta_version", build_then_an_operator_rolls_back)
    with pytest.raises(Conflict, match="CURRENT moved from generation 2 to 3 while this run built") as lost:
        refresh_index(**nightly)
    assert "\n" not in str(lost.value)
    pointer = store.current()
    assert (pointer.version, pointer.generation) == (full["version"], 3)
    built = store.latest_ready()  # kept, ready, never promoted
    assert built.parent == first["version"] and built.version not in {h.to_version for h in store.history()}


def test_an_older_dump_is_not_promoted_over_newer_knowledge_unless_allowed(nightly, mirror, tmp_path, capsys):
    store = IndexStore(nightly["store_url"])
    refresh_index(**nightly)
    _day(mirror, "20240102", 0)
    first = refresh_index(**nightly)
    # README's `-p source=<local dump>`: a dump older than the lineage CURRENT serves, without page 6.
    older = make_dump(tmp_path / "elsewhere", "enwiki", "20231201", PAGES[:5])
    refresh = ["refresh", "--source", str(older), "--store", nightly["store_url"], "--encoder", nightly["encoder"],
               "--encoder-kind", "dpr", "--index-spec", "flat", "--allow-count-change"]
    with pytest.raises(SystemExit) as refused:
        main(refresh)
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code != 0 and len(err) == 1
    assert "(dump 20231201) is older than what CURRENT serves" in err[0] and "dump 20240101 + 1 day to 20240102" \
        in err[0] and "pass --allow-older" in err[0]
    assert store.current().version == first["version"]
    kept = store.latest_ready()
    assert kept.source.dump_date == "20231201" and "deletions_reconciled" not in kept.counts

    outcome = json.loads(_cli(capsys, *refresh, "--allow-older"))
    assert outcome["status"] == "promoted" and outcome["version"] == kept.version  # the kept one, not rebuilt
    assert store.current().version == kept.version


def test_new_content_during_a_hold_is_built_and_validated_but_waits_for_resume(nightly, mirror):
    store = IndexStore(nightly["store_url"])
    full = refresh_index(**nightly)
    _day(mirror, "20240102", 0)
    first = refresh_index(**nightly)
    rollback_index(store_url=nightly["store_url"], reason="day 2 was vandalised")  # rollback-index/manual
    _day(mirror, "20240103", 2)

    held = refresh_index(**nightly)
    assert held["status"] == "held" and "is new content, ready but not promoted" in held["reason"]
    built = store.manifest(held["version"])
    assert built.status == "ready" and built.validation.passed and built.parent == full["version"]
    assert [d.date for d in built.lineage.days] == ["20240102", "20240103"] and first["version"] != built.version
    assert store.current().version == full["version"]
    again = refresh_index(**nightly)  # the same night again: nothing built twice, still waiting
    assert again["status"] == "held" and again["version"] == built.version and len(store.list_versions()) == 3

    resumed = refresh_index(**nightly, resume=True)
    assert resumed["status"] == "promoted" and resumed["version"] == built.version
    assert resumed["released_holds"] and resumed["holds"] == [] and store.current().version == built.version


def test_the_nightly_deployment_takes_resume_and_allow_older():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(refresh_index.fn).properties
    assert schema["resume"]["default"] is False and schema["allow_older"]["default"] is False


def test_a_nightly_full_dump_older_than_the_applied_days_is_caught_up_before_it_is_promoted(nightly, mirror):
    """Full dumps finish days after their date, while the nightly kept applying days past it: the new full
    version alone would know less than CURRENT, so the days after its dump are applied on top of it first."""
    store = IndexStore(nightly["store_url"])
    refresh_index(**nightly)
    _day(mirror, "20240102", 0)
    refresh_index(**nightly)
    _day(mirror, "20240103", 1)
    refresh_index(**nightly)
    # The full dump of 20240102 (page 0 as that day left it) finished after day 20240103 was applied.
    edited = Page(PAGES[0].page_id, PAGES[0].title, f"{PAGES[0].text} edited on 20240102 words0", rev_id=100_000)
    mirror.add_run("enwiki", "20240102", [edited, *PAGES[1:]])

    caught = refresh_index(**nightly)
    assert caught["status"] == "promoted" and caught["mode"] == "delta"
    lineage = store.manifest(store.current().version).lineage
    assert store.manifest(lineage.base_version).source.dump_date == "20240102"
    assert [d.date for d in lineage.days] == ["20240103"]
