"""Options that several commands share, defined once so each command spells them the same."""

from __future__ import annotations

from typing import Annotated

import typer

StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="Store URL: path, file:// or s3:// (default: RAGINDEX_STORE_URL)."),
]
