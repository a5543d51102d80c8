"""The one settings model (`RAGINDEX_*`), read at the edge: CLI, flow entry, server start.

Everything below the edge receives plain arguments; no other module reads the environment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.cache import CacheConfig
from storage.errors import NotFound, RagindexError
from storage.fs import is_local
from storage.signing import Signer, TrustedKeys
from storage.sizes import format_size, parse_size
from storage.store import IndexStore
from tasks.index_spec import DEFAULT_MEMORY_BUDGET

DEFAULT_DPR_CTX = "facebook/dpr-ctx_encoder-multiset-base"
DEFAULT_DPR_QUESTION = "facebook/dpr-question_encoder-multiset-base"
USER_AGENT = "ragindex/0.1 (https://github.com/ragindex/ragindex; index refresh bot)"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGINDEX_", extra="ignore")

    store_url: str = "./var/ragindex"
    s3_endpoint_url: str | None = None
    mirror: str = "https://dumps.wikimedia.org"
    # The live path (refresh --live): Wikimedia EventStreams, and the wiki's Action API (default: derived from
    # the wiki's name, enwiki -> https://en.wikipedia.org/w/api.php). A stream quiet this long has caught up.
    streams_url: str = "https://stream.wikimedia.org"
    api_url: str | None = None
    stream_idle_s: float = Field(5.0, gt=0)
    user_agent: str = USER_AGENT
    wiki: str = "enwiki"
    dump_date: str = "latest"
    encoder: str = DEFAULT_DPR_CTX
    encoder_kind: Literal["dpr", "mean"] = "dpr"
    # How articles become passages (tasks.chunk.CHUNKERS): `sections` restarts DPR's 100-word windows at every
    # section, so an edit re-embeds its section's passages only (benchmarks/chunker_bench.py).
    chunker: Literal["dpr", "sections"] = "sections"
    question_encoder: str | None = None
    index_spec: str = "auto"
    memory_budget: str = format_size(DEFAULT_MEMORY_BUDGET)
    rag_model: str = "facebook/rag-sequence-nq"
    admin_token: str | None = None
    # A takedown reaches every serving replica within one poll (the deny-list is read with CURRENT):
    # 5 s keeps "takedown command -> page gone" under 10 s at one GET and one LIST per poll.
    poll_seconds: float = Field(5.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # What one client may hold on the server: slow request heads and bodies are cut off, connections capped.
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(30.0, gt=0)
    keep_alive: int = Field(5, gt=0)
    max_connections: int = Field(256, gt=0)
    debug: bool = False
    # The local cache of verified store files (see storage.cache): base directory and size bound.
    cache_dir: str | None = None
    xdg_cache_home: str | None = Field(None, validation_alias="XDG_CACHE_HOME")
    cache_max_size: str = "20GiB"
    # How often a refresh run reports embedding progress (log line with rate and time left, progress artifact).
    progress_seconds: float = Field(10.0, gt=0)
    # A delta lineage past either budget is compacted into one version after the run's promote.
    compact_segments: int = Field(32, ge=1)
    compact_tombstone_share: float = Field(0.2, gt=0, le=1)
    ready_grace_seconds: float = Field(60.0, ge=0)  # /readyz fails after CURRENT is unservable this long
    # Manifest signatures (storage.signing): a build worker's private key (a PEM file) signs every version
    # it commits; with trusted public keys (PEM files or directories of *.pub.pem, comma-separated),
    # promote, rollback, query and serve refuse a version not signed by one of them.
    signing_key: str | None = None
    trusted_keys: str | None = None

    @field_validator("memory_budget", "cache_max_size")
    @classmethod
    def _is_a_size(cls, v: str) -> str:
        parse_size(v)
        return v

    @property
    def memory_budget_bytes(self) -> int:
        return parse_size(self.memory_budget)

    @property
    def cache_max_bytes(self) -> int:
        return parse_size(self.cache_max_size)

    @property
    def cache_config(self) -> CacheConfig:
        """The one place the local file cache's settings are read: every store the edge opens carries them."""
        return CacheConfig(self.cache_base, self.cache_max_bytes)

    @property
    def cache_base(self) -> str | None:
        """RAGINDEX_CACHE_DIR, else $XDG_CACHE_HOME/ragindex, else None (storage.cache's ~/.cache/ragindex)."""
        if self.cache_dir:
            return self.cache_dir
        return f"{self.xdg_cache_home.rstrip('/')}/ragindex" if self.xdg_cache_home else None


class SettingsError(RagindexError):
    """A `RAGINDEX_*` (or other) environment variable whose value the settings cannot take."""


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """The settings from the environment; a bad value is a `SettingsError` naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_variable_error(exc)) from None


def _variable_error(exc: ValidationError) -> str:
    """`RAGINDEX_MEMORY_BUDGET: not a size: 'lots' (...)`: the variable a user set, not the field it fills."""
    errors = exc.errors()
    err = errors[0]
    name = str(err["loc"][0]) if err.get("loc") else "?"
    field = Settings.model_fields.get(name)
    if field is None:  # pydantic names a field read through its alias by the alias: the variable itself
        variable = name
    elif isinstance(field.validation_alias, str):
        variable = field.validation_alias
    else:
        variable = f"{Settings.model_config['env_prefix']}{name}".upper()
    cause = (err.get("ctx") or {}).get("error")
    # A validator's own message quotes the value; pydantic's type errors do not.
    message = str(cause) if cause is not None else f"{err['msg']} (got {err.get('input')!r})"
    more = f" (and {len(errors) - 1} more bad setting(s))" if len(errors) > 1 else ""
    return f"{variable}: {message}{more}"


def open_store(url: str | None = None, settings: Settings | None = None, *, must_exist: bool = False) -> IndexStore:
    """The store at `url` (default: RAGINDEX_STORE_URL).

    `must_exist` is for commands that only read or move what a store holds (versions, query, serve,
    promote, rollback, gc, pin): a root that does not exist is then a `NotFound` naming it, so a typo
    is not mistaken for an empty store. A root that exists but holds no version yet is fine. On S3,
    where a prefix exists only through the objects under it, the bucket must exist. Commands that
    create a store (download, build, refresh, demo) leave it False.
    """
    s = settings or load_settings()
    store = IndexStore(url or s.store_url, s3_endpoint_url=s.s3_endpoint_url, cache=s.cache_config, **store_keys(s))
    if must_exist:
        check_store_exists(store)
    return store


def store_keys(settings: Settings) -> dict[str, Signer | TrustedKeys | None]:
    """The `signer` and `trusted_keys` an `IndexStore` opened here gets from RAGINDEX_SIGNING_KEY and
    RAGINDEX_TRUSTED_KEYS (None each when unset: unsigned versions, trusted as before)."""
    return {"signer": _signer(settings.signing_key) if settings.signing_key else None,
            "trusted_keys": _trusted(settings.trusted_keys) if settings.trusted_keys else None}


@lru_cache(maxsize=4)
def _signer(path: str) -> Signer:
    try:
        return Signer.load(path)
    except RagindexError as exc:
        raise SettingsError(f"RAGINDEX_SIGNING_KEY: {exc}") from None


@lru_cache(maxsize=4)
def _trusted(paths: str) -> TrustedKeys:
    files = []
    for entry in (p.strip() for p in paths.split(",")):
        if entry and os.path.isdir(entry):
            files += sorted(os.path.join(entry, n) for n in os.listdir(entry) if n.endswith(".pub.pem"))
        elif entry:
            files.append(entry)
    try:
        return TrustedKeys.load(files)
    except RagindexError as exc:
        raise SettingsError(f"RAGINDEX_TRUSTED_KEYS: {exc}") from None


def check_store_exists(store: IndexStore) -> None:
    """`NotFound` unless the store's root is a directory (locally) or its bucket exists (on S3)."""
    if is_local(store.fs):
        if not store.fs.isdir(store.root):
            what = "is not a directory" if store.fs.exists(store.root) else "does not exist"
            raise NotFound(f"store {store.url} {what} (download, build, refresh and demo create a store)")
        return
    bucket = store.root.split("/", 1)[0]
    if not store.fs.exists(bucket):
        raise NotFound(f"store {store.url}: bucket {bucket!r} does not exist")
