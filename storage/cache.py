"""The one remote -> local file cache: faiss and Arrow memory-map local files only.

A local store's files are used in place. A remote file is copied once into
`<cache_dir>/<key>/<name>`, keyed by its URL and size (versions are immutable), through a temp
name and a rename, so a crash never leaves a half file that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid

import fsspec

from storage.fs import is_local, to_url

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "ragindex-cache")


def local_copy(fs: fsspec.AbstractFileSystem, path: str, cache_dir: str | None = None) -> str:
    """A local path holding the bytes of `path`: itself on a local filesystem, else a cached copy.

    Raises FileNotFoundError when `path` does not exist.
    """
    if is_local(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return path
    url = to_url(fs, path)
    size = fs.size(path)
    key = hashlib.sha256(f"{url}\0{size}".encode()).hexdigest()[:24]
    target = os.path.join(cache_dir or default_cache_dir(), key, os.path.basename(path))
    if os.path.exists(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("copied %s to the local cache %s for memory mapping", url, target)
    return target
