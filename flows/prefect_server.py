"""A real Prefect server in a child process, for the demo and for trying deployments locally."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import RagindexError, first_line


@contextmanager
def temporary_prefect_server(home: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start a Prefect API server with its SQLite database under `home`; yield the API URL.

    Prefect's own subprocess server picks the port, waits for health and stops the child; only the
    database location is ours. The database outlives the context, so the runs can be looked at later
    with `PREFECT_HOME=<home> prefect server start`.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    home.mkdir(parents=True, exist_ok=True)
    server = SubprocessASGIServer()  # one per process: stopping a shared one would stop someone else's
    if server.running:
        raise RagindexError("a temporary Prefect server is already running in this process")
    # The child inherits the settings in force when it starts: this home, no analytics.
    with temporary_settings(updates={PREFECT_HOME: home.resolve(), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        try:
            server.start(timeout=int(timeout))
        except RuntimeError as exc:
            server.stop()
            raise RagindexError(f"the Prefect server did not start: {first_line(exc)}") from exc
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            os.environ["PREFECT_API_URL"] = server.api_url  # for child processes (process workers, Ray)
            try:
                yield server.api_url
            finally:
                # Send the runs' queued log lines while the server can still take them.
                from prefect.logging.handlers import APILogHandler

                APILogHandler().flush()
                os.environ.pop("PREFECT_API_URL", None)
    finally:
        server.stop()
