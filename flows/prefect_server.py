"""A real Prefect server in a child process, for the demo and for trying deployments locally."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from storage.errors import RagindexError


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def temporary_prefect_server(home: Path, port: int | None = None, timeout: float = 90.0) -> Iterator[str]:
    """Start `prefect server start` with its SQLite database under `home`; yield the API URL.

    The database outlives the context, so the runs can be looked at later with
    `PREFECT_HOME=<home> prefect server start`.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home.resolve()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until_answering(f"{api_url}/health", proc, timeout, f"the Prefect server (log: {home / 'server.log'})")
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            os.environ["PREFECT_API_URL"] = api_url  # for child processes (process workers, Ray)
            try:
                yield api_url
            finally:
                # Send the runs' queued log lines while the server can still take them.
                from prefect.logging.handlers import APILogHandler

                APILogHandler().flush()
                os.environ.pop("PREFECT_API_URL", None)
    finally:
        stop_process(proc, timeout=20)
        log.close()


def wait_until_answering(url: str, proc: subprocess.Popen, timeout: float, what: str = "the server") -> None:
    """Poll `url` until it answers 200; fail at once if `proc` exits first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RagindexError(f"{what} exited with code {proc.returncode} before answering")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RagindexError(f"{what} did not answer at {url} within {timeout:.0f}s")
