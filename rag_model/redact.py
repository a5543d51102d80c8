"""What anyone may see of a status or a catalogue: where the store and the models live on disk is the
operator's (the rule `GET /v1/index` follows, and the console with it)."""

from __future__ import annotations

import re
from typing import Any

# An absolute or ./ ~/ path, not the tail of a URL or of a hub id like "facebook/dpr-...".
_PATH = re.compile(r"(?<![\w:/.~-])(?:file://)?(?:~|\.{1,2})?/[^\s'\"(),;]+")


def without_paths(value: Any, store_url: str) -> Any:
    """The status as anyone may see it: where the store and the models live on disk is the operator's."""
    if isinstance(value, dict):
        return {k: without_paths(v, store_url) for k, v in value.items() if k != "url"}
    if isinstance(value, list):
        return [without_paths(v, store_url) for v in value]
    if isinstance(value, str):
        return _PATH.sub("<path>", value.replace(store_url, "<store>"))
    return value
