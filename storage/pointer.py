"""Compare-and-swap of small JSON objects (CURRENT, locks) on local disk and on S3.

Locally: an `fcntl` lock file serialises writers, and `os.replace` makes the new content appear
whole. On S3: a conditional PutObject (`If-Match` on the ETag we read, or `If-None-Match: *` to
create) lets exactly one of several racing writers win; s3fs has no API for that, so we call the
underlying aiobotocore client. Either way a lost race raises `Conflict` and the object is never torn.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.asyn import sync

from storage.errors import Conflict, NotFound, RagindexError
from storage.fs import atomic_write, is_local

Token = str | None  # what identifies the state we read: a generation-bearing ETag on S3, None = absent


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, Any] | None, Token]:
    """Read a JSON object and the token a later `swap_json` must present. (None, None) if absent."""
    data, token = read_raw(fs, path)
    return (None, None) if data is None else (_parse(data, path), token)


def read_raw(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes | None, Token]:
    """The bytes of a small object and its token, even when they are not valid JSON. (None, None) if absent."""
    if is_local(fs):
        try:
            with open(path, "rb") as f:
                return f.read(), "local"
        except FileNotFoundError:
            return None, None
    bucket, key = _split(path)
    try:
        return sync(fs.loop, _s3_get, fs, bucket, key)
    except FileNotFoundError:
        return None, None


def replace_exact(fs: fsspec.AbstractFileSystem, path: str, seen: bytes, token: Token, new: dict[str, Any]) -> None:
    """Write `new` at `path` only if the object still holds exactly `seen` (read with `token`).

    Works on objects that are not valid JSON (a malformed lock file), unlike `swap_json`'s `check`."""

    def same(current: dict[str, Any] | None) -> None:  # S3: the ETag guards; this runs only locally
        now, _ = read_raw(fs, path)
        if now != seen:
            raise Conflict(f"{path} changed while we were replacing it")

    _swap(fs, path, same, new, token, parse=False)


def delete_exact(fs: fsspec.AbstractFileSystem, path: str, seen: bytes) -> bool:
    """Delete `path` only if it still holds exactly `seen`; False (and nothing deleted) otherwise.

    Locally the comparison and the removal happen under the writers' lock. On S3 there is a short
    window between the read and the DELETE (DeleteObject has no portable condition); callers use
    this for leases they keep alive, so nobody else may legitimately replace the object meanwhile.
    """
    if is_local(fs):
        if not os.path.exists(path):
            return False
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                now, _ = read_raw(fs, path)
                if now != seen:
                    return False
                os.remove(path)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    now, _ = read_raw(fs, path)
    if now != seen:
        return False
    delete_json(fs, path)
    return True


def swap_json(
    fs: fsspec.AbstractFileSystem,
    path: str,
    check: Callable[[dict[str, Any] | None], None],
    new: dict[str, Any],
    token: Token,
) -> None:
    """Write `new` at `path` only if the object is still the one `check` approves of.

    `check(current)` raises `Conflict` when the current content is not what the caller read.
    Locally it runs under the lock, on the freshly re-read content. On S3 the ETag `token`
    from `read_json` is the guard (None: the object must not exist yet).
    """
    _swap(fs, path, check, new, token, parse=True)


def _swap(
    fs: fsspec.AbstractFileSystem,
    path: str,
    check: Callable[[dict[str, Any] | None], None],
    new: dict[str, Any],
    token: Token,
    parse: bool,
) -> None:
    body = encode(new)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                check(read_json(fs, path)[0] if parse else None)
                with atomic_write(fs, path) as f:
                    f.write(body)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    bucket, key = _split(path)
    condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
    except Exception as exc:  # botocore raises ClientError; s3fs may translate it
        if _is_precondition_failure(exc):
            # A retried PUT whose first attempt landed fails its own precondition: that is a win.
            if _current_bytes(fs, bucket, key) == body:
                return
            raise Conflict(f"{path} changed while we were writing it (lost a compare-and-swap race)") \
                from None
        raise


def create_json(fs: fsspec.AbstractFileSystem, path: str, new: dict[str, Any]) -> None:
    """Create `path`, whole, only if it does not exist yet; `Conflict` if it does."""
    if not is_local(fs):
        swap_json(fs, path, lambda current: None, new, token=None)
        return
    # Write a temp file, then hard-link it into place: link() fails if the name exists, so
    # creation is atomic and exclusive without leaving a lock file beside every object.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(encode(new))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise Conflict(f"{path} already exists") from None
    finally:
        os.remove(tmp)


def ignored_conditions(fs: fsspec.AbstractFileSystem, probe: str) -> list[str]:
    """The conditions (If-None-Match, If-Match) the backend ignores, found with writes to the
    fresh key `probe` that must fail; the probe is deleted afterwards. [] when both are honoured."""
    ignored = []
    try:
        create_json(fs, probe, {"probe": 1})
        data, _ = read_raw(fs, probe)
        try:
            create_json(fs, probe, {"probe": 2})  # If-None-Match: * on an existing key
            ignored.append("If-None-Match")
        except Conflict:
            pass
        try:
            replace_exact(fs, probe, data or b"", '"0123456789abcdef0123456789abcdef"', {"probe": 3})
            ignored.append("If-Match")
        except Conflict:
            pass
    finally:
        delete_json(fs, probe)
    return ignored


def encode(obj: dict[str, Any]) -> bytes:
    """The bytes `swap_json` / `create_json` write for `obj` (what `delete_exact` compares against)."""
    return json.dumps(obj, indent=2, default=str).encode()


def delete_json(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def _parse(data: bytes, path: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise RagindexError(f"{path} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise RagindexError(f"{path} does not hold a JSON object")
    return obj


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    if not key:
        raise NotFound(f"no key in S3 path {path!r}")
    return bucket, key


async def _s3_get(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    # One GetObject gives the body and the ETag of the same object version: a HEAD then GET
    # could pair old content with a new ETag and let a stale swap through.
    try:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        raise
    except Exception as exc:
        if "NoSuchKey" in repr(exc) or "404" in repr(exc):
            raise FileNotFoundError(key) from None
        raise
    async with resp["Body"] as body:
        data = await body.read()
    return data, resp["ETag"]


def _current_bytes(fs: Any, bucket: str, key: str) -> bytes | None:
    try:
        data, _ = sync(fs.loop, _s3_get, fs, bucket, key)
    except FileNotFoundError:
        return None
    return data


def _is_precondition_failure(exc: Exception) -> bool:
    # s3fs translates HTTP 412 into FileExistsError("At least one of the pre-conditions ...");
    # 409 ConditionalRequestConflict is what S3 answers to a concurrent conditional write.
    if isinstance(exc, FileExistsError):
        return True
    text = f"{exc!r} {exc.__cause__!r}"
    return any(s in text for s in ("PreconditionFailed", "412", "ConditionalRequestConflict", "pre-conditions"))
