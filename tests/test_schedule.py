"""The schedules in prefect.yaml, as the server runs them: `make deploy` against `prefect server start`,
then the server's scheduler service, and nothing else, creates every scheduled deployment's next runs.

The other deployment tests start their runs by hand on Prefect's ephemeral test server, which runs no
scheduler. With SQLAlchemy 2.1.9 the scheduler failed on every loop (`InvalidRequestError: Can't
evaluate bulk DML statement`), only in the server's log, and the nightly run was never created.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.prefect import ROOT, SCHEDULER_LOOP_SECONDS, PrefectServer

# The scheduler acts on a new deployment within one of its loops (or the 5 s loop for recently changed
# deployments); this leaves room for a loaded machine without letting a silent scheduler pass.
SCHEDULED_WITHIN_SECONDS = max(45.0, 10 * SCHEDULER_LOOP_SECONDS)

# What a failing scheduler leaves in the server log: Prefect's `HH:MM:SS.mmm | ERROR | logger - ...`
# records and the tracebacks under them.
_LOG_ERROR = re.compile(r"\|\s*(ERROR|CRITICAL)\s*\||Traceback|InvalidRequestError")


def scheduled_deployments() -> list[dict]:
    """The deployments of prefect.yaml with at least one active schedule."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return [d for d in spec["deployments"] if any(s.get("active", True) for s in d.get("schedules") or [])]


def log_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if _LOG_ERROR.search(line)]


def _post(server: PrefectServer, path: str, body: dict) -> list[dict]:
    # An explicit limit: prefect 3.8.8's server refuses the `limit: null` newer clients send by default.
    response = httpx.post(f"{server.api_url}{path}", json={"limit": 200, **body}, timeout=30)
    response.raise_for_status()
    return response.json()


def _schedule_key(schedule: dict) -> tuple:
    """What prefect.yaml and the server must agree on for one schedule."""
    if "cron" in schedule:
        return ("cron", schedule["cron"], schedule.get("timezone") or "UTC")
    if "interval" in schedule:
        interval = schedule["interval"]
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
        return ("interval", seconds)
    raise AssertionError(f"this test checks cron and interval schedules; extend it for {schedule}")


def _expected_dates(schedule: dict, start: datetime, n: int) -> list[datetime]:
    """The schedule's first `n` dates on or after `start`, computed here from the schedule the server stored."""
    from prefect.server.schemas.schedules import CronSchedule, IntervalSchedule

    model = CronSchedule if "cron" in schedule else IntervalSchedule
    return [d.astimezone(UTC) for d in asyncio.run(model.model_validate(schedule).get_dates(n=n, start=start))]


def _make_deploy(server: PrefectServer, tmp_path: Path) -> None:
    # The venv running this test stands in for .venv, and a fresh stamp tells make it is installed, so
    # the target runs as written without reinstalling anything.
    stamp = tmp_path / "installed"
    stamp.touch()
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(["make", "-s", "deploy", f"VENV={venv}", f"STAMP={stamp}"], cwd=ROOT, env=server.env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"make deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_scheduler_creates_the_runs_of_every_scheduled_deployment(prefect_server: PrefectServer, tmp_path):
    from prefect.settings import get_current_settings

    min_runs = get_current_settings().server.services.scheduler.min_runs
    wanted = scheduled_deployments()
    assert "nightly" in [d["name"] for d in wanted], "prefect.yaml's nightly deployment lost its schedule"

    deployed_at = datetime.now(UTC)
    _make_deploy(prefect_server, tmp_path)
    pools = {p["name"]: p["type"] for p in _post(prefect_server, "/work_pools/filter", {})}

    deployments = {}
    for spec in wanted:
        found = _post(prefect_server, "/deployments/filter", {"deployments": {"name": {"any_": [spec["name"]]}}})
        assert len(found) == 1, f"deployment {spec['name']!r}: {len(found)} on the server after make deploy"
        deployment = found[0]
        pool = spec["work_pool"]["name"]
        assert (deployment["work_pool_name"], pools.get(pool)) == (pool, "process"), f"{spec['name']}: {deployment}"
        flow = httpx.get(f"{prefect_server.api_url}/flows/{deployment['flow_id']}", timeout=30).json()
        deployed = sorted(_schedule_key(s["schedule"]) for s in deployment["schedules"] if s["active"])
        declared = sorted(_schedule_key(s) for s in spec["schedules"] if s.get("active", True))
        assert deployed == declared, f"{flow['name']}/{spec['name']}: server has {deployed}, prefect.yaml {declared}"
        deployments[f"{flow['name']}/{spec['name']}"] = deployment

    # Nobody asks for a run: every scheduled run below is the scheduler's own.
    deadline = time.monotonic() + SCHEDULED_WITHIN_SECONDS
    while True:
        runs = {name: _post(prefect_server, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [d["id"]]}}})
                for name, d in deployments.items()}
        errors = log_errors(prefect_server.log_text())
        short = [name for name, d in deployments.items()
                 if any(sum(r["created_by"] and r["created_by"].get("id") == s["id"] for r in runs[name]) < min_runs
                        for s in d["schedules"] if s["active"])]
        if errors or not short or time.monotonic() > deadline:
            break
        time.sleep(1)

    counts = {name: len(r) for name, r in runs.items()}
    assert not errors, f"the Prefect server logged errors; runs so far {counts}:\n" + "\n".join(errors[:20])
    assert not short, f"after {SCHEDULED_WITHIN_SECONDS:.0f}s no {min_runs} runs per schedule of {short}: {counts}"

    for name, deployment in deployments.items():
        for schedule in (s for s in deployment["schedules"] if s["active"]):
            mine = [r for r in runs[name] if r["created_by"] and r["created_by"].get("id") == schedule["id"]]
            for run in mine:
                assert (run["state_type"], run["auto_scheduled"], run["created_by"]["type"]) == \
                    ("SCHEDULED", True, "SCHEDULE"), f"{name}: run {run['name']} is not the scheduler's: {run}"
            times = sorted(datetime.fromisoformat(r["expected_start_time"]).astimezone(UTC) for r in mine)
            expected = _expected_dates(schedule["schedule"], deployed_at, len(times) + 1)
            # One date later when a scheduled time passed between deploying and the scheduler's loop.
            assert times in (expected[:-1], expected[1:]), f"{name}: runs at {times}, the schedule says {expected}"

    # The nightly build, read off the cron by hand: 03:00 UTC on consecutive days, the next one first.
    nightly = sorted(datetime.fromisoformat(r["expected_start_time"]).astimezone(UTC)
                     for r in runs["refresh-index/nightly"])
    assert all((t.hour, t.minute, t.second, t.microsecond) == (3, 0, 0, 0) for t in nightly), nightly
    assert all(b - a == timedelta(days=1) for a, b in zip(nightly, nightly[1:], strict=False)), nightly
    assert deployed_at < nightly[0] <= deployed_at + timedelta(days=1, seconds=60), (deployed_at, nightly[0])
