"""fsspec filesystems for the store and for sources: a local path, `file://` or `s3://`.

Every other module reaches files through `open_url` / `resolve`, so local disk and S3 follow one
code path. The S3 endpoint is passed in (from settings), never read from the environment here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import NotFound, RagindexError
from storage.scratch import run_dir

SUPPORTED_SCHEMES = ("file", "s3")


def resolve(url: str, s3_endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path within it) for a local path, `file://` URL or `s3://` URL."""
    if not url:
        raise RagindexError("empty location: give a local path, file:// or s3:// URL")
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in SUPPORTED_SCHEMES:
        raise RagindexError(f"unsupported URL scheme {scheme!r} in {url!r}: use a local path, file:// or s3://")
    if scheme == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    import s3fs  # imported lazily: local-only users never pay for aiobotocore

    client_kwargs = {"endpoint_url": s3_endpoint_url} if s3_endpoint_url else {}
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)
    return fs, url[len("s3://"):].rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    """Join path parts with '/', the separator every fsspec filesystem uses."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p != "")


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL that `resolve` maps back to (fs, path): what tasks hand each other."""
    return path if is_local(fs) else f"s3://{path}"


@contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator[IO]:
    """Open `path` for writing so that readers see the whole file or none of it.

    Locally: write a temp name in the same directory, fsync, then `os.replace`. On S3 the bytes go
    to a private local temp file and are uploaded only once the writer finished: an s3fs file
    written in place would upload whatever was written even when the writer raised.
    On an exception nothing is left at `path`. (The temp file is private: `storage.scratch`.)
    """
    if not is_local(fs):
        with tempfile.NamedTemporaryFile(mode, prefix=".ragindex-upload-", suffix=".tmp", dir=run_dir()) as tmp:
            yield tmp
            tmp.flush()
            fs.put_file(tmp.name, path)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def staged_local_file(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """A local temp path for writers that need a real file (faiss, Arrow IPC); on success its
    content becomes `path` whole (`os.replace` locally, one upload on S3); on failure it is removed."""
    local = is_local(fs)
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    # Remotely, the writer creates its file by name in this run's private scratch (0700): nobody else can
    # plant a link at that name there, and a killed run's leftovers are swept by the next (storage.scratch).
    directory = os.path.dirname(path) if local else run_dir()
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def link_below(fs: fsspec.AbstractFileSystem, root: str, path: str) -> str | None:
    """The first symbolic link on the way from `root` (excluded: a store's root may be a link to the disk it
    lives on) down to `path` (included), or None. Only local disks have links; a path outside `root` is
    its own answer (nothing outside a store is ever ours to delete)."""
    if not is_local(fs):
        return None
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return path
    here = root
    for part in [] if rel == os.curdir else rel.split(os.sep):
        here = os.path.join(here, part)
        if os.path.islink(here):
            return here
    return None


def remove_inside(fs: fsspec.AbstractFileSystem, root: str, path: str, recursive: bool = True) -> str | None:
    """Delete `path` (with `recursive`, a whole tree) under `root`, never through a symbolic link: a link
    below `root` may point at a backup on another disk, whose files are not the store's to delete. Returns
    None when `path` is gone (or was never there), else the link that was left alone (and what it points at)."""
    link = link_below(fs, root, path)
    if link is not None:
        return link
    with suppress(FileNotFoundError):
        fs.rm(path, recursive=True) if recursive else fs.rm_file(path)
    return None


_TEMP_NAME = re.compile(r"^.+\.[0-9a-f]{32}\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether a file name is a temp name a writer above (or `pointer.create_json`) gives a file it
    has not finished: what a killed writer leaves behind."""
    return bool(_TEMP_NAME.match(name))


def load_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """A small JSON file, parsed: `NotFound` when it is missing, `RagindexError` when it is not JSON.

    (storage.pointer.read_json is the other reader: it also returns the token a compare-and-swap needs.)
    """
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise NotFound(f"{to_url(fs, path)} is missing") from None
    except ValueError:
        raise RagindexError(f"{to_url(fs, path)} is not valid JSON") from None


def file_digest(
    fs: fsspec.AbstractFileSystem,
    path: str,
    algorithm: str = "sha256",
    on_block: Callable[[int], None] | None = None,
) -> str:
    """Hex digest of a file streamed in 4 MiB blocks; `on_block(n)` is told each block's size (progress)."""
    digest = hashlib.new(algorithm)
    with fs.open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
            if on_block:
                on_block(len(block))
    return digest.hexdigest()
