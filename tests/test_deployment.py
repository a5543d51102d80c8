"""The deployments in prefect.yaml, as an operator uses them: `prefect deploy --all`, a real process worker,
`prefect deployment run refresh-index/nightly`, `refresh-index/live` against the loopback EventStreams and
Action API (a delete and an edit reach CURRENT through one run), then `rollback-index/manual` back to the
nightly's version. One worker runs them all, as one would in production."""

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
def test_the_deployments_run_on_a_process_worker(prefect_api, mirror, tiny_dpr, tmp_path, eventstreams, action_api):
    store_url = str(tmp_path / "store")
    pages = sample_pages(6)
    mirror.add_run("enwiki", DUMP, pages)
    env = worker_env(prefect_api, store_url, tiny_dpr.ctx_dir, mirror.url,
                     RAGINDEX_STREAMS_URL=eventstreams.url, RAGINDEX_API_URL=action_api.url,
                     RAGINDEX_STREAM_IDLE_S="1")
    prefect_cli(["work-pool", "create", "ragindex", "--type", "process", "--overwrite"], env)
    deployed = prefect_cli(["--no-prompt", "deploy", "--all"], env)
    for name in ("refresh-index/nightly", "refresh-index/live", "rollback-index/manual"):
        assert name in deployed.stdout

    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "ragindex", "--limit", "1"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The nightly deployment resolves `latest` against the mirror from the worker's settings.
        prefect_cli(["deployment", "run", "refresh-index/nightly", "-p", "shard_rows=40",
                     "-p", "allow_count_change=true", "--watch", "--watch-timeout", "900"], env, timeout=930)
        store = IndexStore(store_url)
        nightly = store.current()
        assert nightly is not None and store.manifest(nightly.version).source.dump_date == DUMP

        gone, edited = pages[0], pages[1]
        eventstreams.add(event("mediawiki.page-delete", "enwiki", gone.page_id, gone.title, gone.revision, _dt(5)))
        eventstreams.add(event("mediawiki.revision-create", "enwiki", edited.page_id, edited.title,
                               edited.revision + 1000, _dt(4)))
        action_api.add(edited.revision + 1000, edited.page_id, edited.title, edited.text + " Zanzibar marmalade.")
        prefect_cli(["deployment", "run", "refresh-index/live", "--watch", "--watch-timeout", "600"], env,
                    timeout=630)
        live = store.manifest(store.current().version)
        assert live.parent == nightly.version and live.lineage.stream is not None
        assert gone.title not in _titles(store, live.version)
        assert live.changes["changed"] == [[edited.page_id, edited.title]]

        prefect_cli(["deployment", "run", "rollback-index/manual", "--watch", "--watch-timeout", "120"], env,
                    timeout=150)
        assert store.current().version == nightly.version
    finally:
        stop_process(worker, timeout=30)
        log.close()
