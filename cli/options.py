"""Options that several commands share, defined once so each command spells them the same."""

from __future__ import annotations

import os
from typing import Annotated

import typer

StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="Store URL: path, file:// or s3:// (default: RAGINDEX_STORE_URL)."),
]


def debug_requested() -> bool:
    """RAGINDEX_DEBUG is set to something true: show tracebacks instead of one line.

    Read straight from the environment, not through the settings: it must work when the settings
    themselves are what fails."""
    return os.environ.get("RAGINDEX_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
