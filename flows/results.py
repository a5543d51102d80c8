"""Result storage for the cached shard tasks that never runs code found in the store.

Prefect decides how to load a persisted result from the record itself (its `metadata.serializer`),
not from the task: a record planted in the store that names the pickle serializer would be
unpickled on the build worker, even by `exists()` during the cache lookup. These storages hand
Prefect a record only when it is plain JSON written by the JSON serializer, with no `__class__`
hints (which Prefect's JSON decoder would import); anything else raises, and Prefect treats a
record it cannot read as a cache miss: the task runs again and writes a fresh record.
"""

from __future__ import annotations

import json
from typing import Any

from prefect.filesystems import LocalFileSystem, RemoteFileSystem

RESULT_SERIALIZER = "json"


class UnsafeResult(ValueError):
    """A persisted result that is not a plain JSON record: treated as absent, never loaded."""


def check_record(content: bytes, where: str) -> bytes:
    """`content` if it is a JSON-serializer result record holding only plain JSON, else `UnsafeResult`."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]["type"]
        result = record["result"]
        value = json.loads(result) if isinstance(result, str) else result
    except (ValueError, KeyError, TypeError):
        raise UnsafeResult(f"{where} is not a result record") from None
    if serializer != RESULT_SERIALIZER:
        raise UnsafeResult(f"{where} was written with the {serializer!r} serializer, not {RESULT_SERIALIZER!r}")
    if _has_class_hint(value):
        raise UnsafeResult(f"{where} names Python classes; only plain JSON results are read")
    return content


def _has_class_hint(value: Any) -> bool:
    if isinstance(value, dict):
        return "__class__" in value or any(_has_class_hint(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_class_hint(v) for v in value)
    return False


class JsonOnlyLocalResults(LocalFileSystem):
    """A local result directory whose reads accept only plain JSON result records."""

    _block_type_name = "ragindex JSON-only local results"

    def read_path(self, path: str, **_: Any) -> bytes:  # Prefect passes _sync=True
        return check_record(super().read_path(path, _sync=True), path)

    async def aread_path(self, path: str) -> bytes:
        return check_record(await super().aread_path(path), path)


class JsonOnlyRemoteResults(RemoteFileSystem):
    """An fsspec (S3) result location whose reads accept only plain JSON result records."""

    _block_type_name = "ragindex JSON-only remote results"

    def read_path(self, path: str, **_: Any) -> bytes:
        return check_record(super().read_path(path, _sync=True), path)

    async def aread_path(self, path: str) -> bytes:
        return check_record(await super().aread_path(path), path)
