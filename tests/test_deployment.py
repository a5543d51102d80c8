"""The deployments in prefect.yaml, as an operator uses them: `prefect deploy --all`, a real
process worker, `prefect deployment run refresh-index/nightly`, then `rollback-index/manual`."""

from __future__ import annotations

import subprocess

import pytest

from storage.store import IndexStore
from tests.fixtures.mirror import sample_pages
from tests.fixtures.prefect import PREFECT, ROOT, prefect_cli, worker_env
from tests.fixtures.processes import stop_process


@pytest.mark.slow
def test_nightly_deployment_runs_on_a_process_worker(prefect_api, mirror, tiny_dpr, tmp_path):
    store_url = str(tmp_path / "store")
    mirror.add_run("enwiki", "20240101", sample_pages(6))
    env = worker_env(prefect_api, store_url, tiny_dpr.ctx_dir, mirror.url)
    prefect_cli(["work-pool", "create", "ragindex", "--type", "process", "--overwrite"], env)
    deployed = prefect_cli(["--no-prompt", "deploy", "--all"], env)
    assert "refresh-index/nightly" in deployed.stdout and "rollback-index/manual" in deployed.stdout

    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "ragindex", "--limit", "1"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The nightly deployment resolves `latest` against the mirror from the worker's settings.
        prefect_cli(["deployment", "run", "refresh-index/nightly", "-p", "shard_rows=40",
                     "-p", "allow_count_change=true", "--watch", "--watch-timeout", "900"], env, timeout=930)
        store = IndexStore(store_url)
        first = store.current()
        assert first is not None and store.manifest(first.version).source.dump_date == "20240101"

        mirror.add_run("enwiki", "20240201", sample_pages(7))
        prefect_cli(["deployment", "run", "refresh-index/nightly", "-p", "allow_count_change=true",
                     "--watch", "--watch-timeout", "900"], env, timeout=930)
        second = store.current()
        assert second.version != first.version and second.previous == first.version

        prefect_cli(["deployment", "run", "rollback-index/manual", "--watch", "--watch-timeout", "120"], env,
                    timeout=150)
        assert store.current().version == first.version
    finally:
        stop_process(worker, timeout=30)
        log.close()
