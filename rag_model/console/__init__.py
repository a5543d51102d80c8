"""The operator's console: `/ui` pages and the `/v1` JSON they are built from, on the app `ragindex serve` runs.

Server-rendered (Jinja2, autoescaped: titles and text come from Wikipedia), charts drawn by matplotlib as
SVG, one small script of ours for the admin actions; nothing from the internet, so it works air-gapped.
Everything it shows comes from the store's catalogue (`storage.catalog`), its history and manifests,
`rag_model.version_diff` and `rag_model.compare`: the same data `ragindex versions`, `diff` and `query
--compare` print.
"""

from rag_model.console.mount import mount_console

__all__ = ["mount_console"]
