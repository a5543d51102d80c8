"""The one settings model (`RAGINDEX_*`), read at the edge: CLI, flow entry, server start.

Everything below the edge receives plain arguments; no other module reads the environment.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    user_agent: str = USER_AGENT
    wiki: str = "enwiki"
    dump_date: str = "latest"
    encoder: str = DEFAULT_DPR_CTX
    encoder_kind: Literal["dpr", "mean"] = "dpr"
    question_encoder: str | None = None
    index_spec: str = "auto"
    memory_budget: str = format_size(DEFAULT_MEMORY_BUDGET)
    rag_model: str = "facebook/rag-sequence-nq"
    admin_token: str | None = None
    poll_seconds: float = Field(10.0, gt=0)
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
    ready_grace_seconds: float = Field(60.0, ge=0)  # /readyz fails after CURRENT is unservable this long

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
    def cache_base(self) -> str | None:
        """RAGINDEX_CACHE_DIR, else $XDG_CACHE_HOME/ragindex, else None (storage.cache's ~/.cache/ragindex)."""
        if self.cache_dir:
            return self.cache_dir
        return f"{self.xdg_cache_home.rstrip('/')}/ragindex" if self.xdg_cache_home else None


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    return Settings()


def open_store(url: str | None = None, settings: Settings | None = None) -> IndexStore:
    s = settings or load_settings()
    return IndexStore(url or s.store_url, s3_endpoint_url=s.s3_endpoint_url)
