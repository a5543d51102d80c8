"""The `refresh-index/live` deployment of prefect.yaml on a real process worker, against the loopback
EventStreams and Action API: a delete and an edit reach CURRENT through one scheduled-style run."""

from __future__ import annotations

import subprocess

import pytest

from storage.store import IndexStore
from tests.fixtures.eventstreams import event
from tests.fixtures.mirror import sample_pages
from tests.fixtures.prefect import PREFECT, ROOT, prefect_cli, worker_env
from tests.fixtures.processes import stop_process
from tests.test_live_flow import DUMP, _dt, _titles


@pytest.mark.slow
def test_live_deployment_runs_on_a_process_worker(prefect_api, mirror, tiny_dpr, tmp_path, eventstreams,
                                                  action_api):
    store_url = str(tmp_path / "store")
    pages = sample_pages(6)
    mirror.add_run("enwiki", DUMP, pages)
    env = worker_env(prefect_api, store_url, tiny_dpr.ctx_dir, mirror.url,
                     RAGINDEX_STREAMS_URL=eventstreams.url, RAGINDEX_API_URL=action_api.url,
                     RAGINDEX_STREAM_IDLE_S="1")
    prefect_cli(["work-pool", "create", "ragindex", "--type", "process", "--overwrite"], env)
    deployed = prefect_cli(["--no-prompt", "deploy", "--all"], env)
    assert "refresh-index/live" in deployed.stdout

    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "ragindex", "--limit", "1"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        prefect_cli(["deployment", "run", "refresh-index/nightly", "-p", "allow_count_change=true",
                     "--watch", "--watch-timeout", "900"], env, timeout=930)
        store = IndexStore(store_url)
        base = store.current().version
        gone, edited = pages[0], pages[1]
        eventstreams.add(event("mediawiki.page-delete", "enwiki", gone.page_id, gone.title, gone.revision, _dt(5)))
        eventstreams.add(event("mediawiki.revision-create", "enwiki", edited.page_id, edited.title,
                               edited.revision + 1000, _dt(4)))
        action_api.add(edited.revision + 1000, edited.page_id, edited.title, edited.text + " Zanzibar marmalade.")
        prefect_cli(["deployment", "run", "refresh-index/live", "--watch", "--watch-timeout", "600"], env,
                    timeout=630)
        live = store.manifest(store.current().version)
        assert live.parent == base and live.lineage.stream is not None
        assert gone.title not in _titles(store, live.version)
        assert live.changes["changed"] == [[edited.page_id, edited.title]]
    finally:
        stop_process(worker, timeout=30)
        log.close()
