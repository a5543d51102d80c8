"""Where files are: a URL and the S3 endpoint that reaches it, carried together and resolved once.

Below the edges, every step that reads or writes files takes a `Location` instead of a URL plus an
endpoint: the edges (CLI options, flow parameters, settings) make one from what the user typed and
`RAGINDEX_S3_ENDPOINT_URL`, and a store hands out the locations inside its versions
(`IndexStore.at`). Like Lance's storage options, the endpoint is given once, where a location is first
named. The settings of the local file cache travel the same way (`cache`). A `Location` pickles as its
URL, endpoint and cache settings (a Ray worker gets one and makes its own
filesystem); its filesystem is made on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec

from storage.cache import CacheConfig
from storage.fs import is_local, join, resolve, to_url


@dataclass(frozen=True)
class Location:
    url: str  # a local path, file:// or s3:// URL
    s3_endpoint_url: str | None = None  # the S3-compatible endpoint that serves an s3:// URL (None: AWS's)
    cache: CacheConfig = field(default=CacheConfig(), compare=False)  # the local cache its files are read through

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", os.fspath(self.url))  # a pathlib.Path names a local directory too

    @cached_property
    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return resolve(self.url, self.s3_endpoint_url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._resolved[0]

    @property
    def path(self) -> str:
        """The path within `fs` (an absolute local path, or bucket/key)."""
        return self._resolved[1]

    @property
    def name(self) -> str:
        """The last part of the path (a file's name)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    def child(self, *parts: str) -> Location:
        """The location of `parts` below this one, reached the same way."""
        return Location(join(self.url, *parts), self.s3_endpoint_url, self.cache)

    def sibling(self, path: str) -> Location:
        """Another path of the same filesystem (as `fs` names it), reached the same way."""
        return Location(to_url(self.fs, path), self.s3_endpoint_url, self.cache)

    def reach(self, url: str) -> Location:
        """Another URL, reached through the same endpoint (a record's file, named by its URL)."""
        return Location(url, self.s3_endpoint_url, self.cache)

    def contains(self, other: Location) -> bool:
        """Whether `other` lies below this location (same filesystem): where a record may point."""
        return type(other.fs) is type(self.fs) and other.path.startswith(self.path.rstrip("/") + "/")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Location, (self.url, self.s3_endpoint_url, self.cache))  # not the filesystem made on first use

    def __str__(self) -> str:
        return self.url
