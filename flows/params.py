"""The refresh-index parameters, checked in full before any work starts.

A flow parameter left empty takes its `RAGINDEX_*` setting; anything out of range (a negative
memory budget, an unknown index spec, a store URL with an unsupported scheme) fails here with one
readable line, so a bad nightly run costs nothing and leaves CURRENT untouched.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from flows.settings import Settings, load_settings, parse_size, store_keys
from storage.errors import Rejected
from storage.fs import is_local, resolve
from storage.layout import DEFAULT_SHARD_ROWS, RESULTS_DIR
from storage.names import check_dump_date, check_wiki
from storage.store import IndexStore
from tasks.index_spec import check_index_spec
from tasks.validation_floors import DEFAULT_COUNT_TOLERANCE, DEFAULT_MIN_RECALL, DEFAULT_MIN_SELF_RETRIEVAL


class RefreshParams(BaseModel):
    wiki: str
    dump_date: str
    source: str | None = None
    source_wiki: str | None = None  # --wiki given with --source: names a dump whose wiki cannot be told
    source_date: str | None = None  # --date given with --source: dates a dump whose file names carry no date
    allow_unverified: bool = False  # download mirror files that have neither size nor sha1
    store_url: str
    s3_endpoint_url: str | None = None
    mirror: str
    user_agent: str
    streams_url: str = "https://stream.wikimedia.org"
    api_url: str | None = None  # None: the wiki's own (`action_api_url`)
    stream_idle_s: float = Field(5.0, gt=0)
    encoder: str
    encoder_kind: Literal["dpr", "mean"]
    chunker: Literal["dpr", "sections"]  # tasks.chunk.CHUNKERS
    normalize: bool | None = None  # None: the model's own sentence-transformers config, else off
    question_encoder: str | None = None
    index_spec: str
    memory_budget: str
    min_recall: float = Field(DEFAULT_MIN_RECALL, ge=0, le=1)
    min_self_retrieval: float = Field(DEFAULT_MIN_SELF_RETRIEVAL, ge=0, le=1)
    count_tolerance: float = Field(DEFAULT_COUNT_TOLERANCE, ge=0)
    allow_count_change: bool = False
    canaries: str | None = None
    promote: bool = True
    force: bool = False
    # Release every rollback hold before planning (what `ragindex resume` does), so this run may promote.
    resume: bool = False
    # Promote a version whose knowledge is older than CURRENT's (an older dump, or a dump older than the
    # serving lineage's newest applied day); without it such a version is built, kept and not promoted.
    allow_older: bool = False
    task_runner: Literal["threads", "ray"] = "threads"
    ray_address: str | None = None
    shard_rows: int = Field(DEFAULT_SHARD_ROWS, ge=1)
    batch_size: int = Field(64, ge=1, le=4096)
    # auto: the fastest variant measured within tolerance of fp32 on this machine; a fixed one is reproducible.
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    # torch.compile the encoder of a full build (a one-time cost per process that big builds earn back);
    # deltas encode a few hundred passages and never compile.
    compile: bool = False
    max_workers: int | None = Field(None, ge=1)
    progress_seconds: float = Field(10.0, gt=0)  # RAGINDEX_PROGRESS_SECONDS; not a flow parameter
    compact_segments: int = Field(32, ge=1)  # RAGINDEX_COMPACT_SEGMENTS; not a flow parameter
    compact_tombstone_share: float = Field(0.2, gt=0, le=1)  # RAGINDEX_COMPACT_TOMBSTONE_SHARE; likewise
    # auto: a newer full dump -> full build, else the finished adds-changes days -> a delta, else up to date.
    # live: the EventStreams changes since the serving lineage's stream position -> one delta (a micro-delta).
    mode: Literal["auto", "full", "incremental", "live"] = "auto"

    @classmethod
    def from_flow(cls, settings: Settings, **given: Any) -> RefreshParams:
        """Flow parameters over settings: None means "use the setting"."""
        defaults = {
            "wiki": settings.wiki,
            "dump_date": settings.dump_date,
            "store_url": settings.store_url,
            "mirror": settings.mirror,
            "streams_url": settings.streams_url,
            "api_url": settings.api_url,
            "stream_idle_s": settings.stream_idle_s,
            "encoder": settings.encoder,
            "encoder_kind": settings.encoder_kind,
            "chunker": settings.chunker,
            "question_encoder": settings.question_encoder,
            "index_spec": settings.index_spec,
            "memory_budget": settings.memory_budget,
        }
        values = {k: v for k, v in given.items() if v is not None}
        if values.get("source") and values.get("wiki"):
            values["source_wiki"] = values["wiki"]
        if values.get("source") and values.get("dump_date") not in (None, "latest"):
            values["source_date"] = values.pop("dump_date")
        return cls(
            **{**defaults, **values},
            s3_endpoint_url=settings.s3_endpoint_url,
            user_agent=settings.user_agent,
            progress_seconds=settings.progress_seconds,
            compact_segments=settings.compact_segments,
            compact_tombstone_share=settings.compact_tombstone_share,
        )

    @field_validator("wiki")
    @classmethod
    def _wiki(cls, v: str) -> str:
        return check_wiki(v)

    @field_validator("source_wiki")
    @classmethod
    def _source_wiki(cls, v: str | None) -> str | None:
        return v if v is None else check_wiki(v)

    @field_validator("source_date")
    @classmethod
    def _source_date(cls, v: str | None) -> str | None:
        return v if v is None else check_dump_date(v)

    @field_validator("dump_date")
    @classmethod
    def _date(cls, v: str) -> str:
        return v if v == "latest" else check_dump_date(v)

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        parse_size(v)
        return v

    @field_validator("index_spec")
    @classmethod
    def _spec(cls, v: str) -> str:
        try:
            return check_index_spec(v)  # the grammar `ragindex build` uses, so both accept the same specs
        except Rejected as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _locations(self) -> RefreshParams:
        resolve(self.store_url, self.s3_endpoint_url)  # raises on an unsupported scheme
        if self.source:
            resolve(self.source, self.s3_endpoint_url)
        if self.canaries and not os.path.isfile(self.canaries):
            raise ValueError(f"canaries file {self.canaries!r} does not exist")
        if self.task_runner == "ray" and not self.ray_address:
            self.ray_address = "local"
        if self.task_runner == "ray" and self.compile:
            raise ValueError("compile is for the threads task runner; Ray actors load the encoder as it is")
        return self

    # -- what the flow builds from them ------------------------------------------------------------

    @property
    def action_api_url(self) -> str:
        """RAGINDEX_API_URL, else the wiki's own api.php (`enwiki` -> https://en.wikipedia.org/w/api.php)."""
        if self.api_url:
            return self.api_url
        language = self.wiki.removesuffix("wiki").replace("_", "-")
        return f"https://{language}.wikipedia.org/w/api.php"

    @property
    def memory_budget_bytes(self) -> int:
        return parse_size(self.memory_budget)

    def store(self) -> IndexStore:
        """The run's store, with the worker's cache settings and keys (its RAGINDEX_SIGNING_KEY signs its commits)."""
        settings = load_settings()
        return IndexStore(self.store_url, s3_endpoint_url=self.s3_endpoint_url, cache=settings.cache_config,
                          **store_keys(settings))

    def encoder_spec(self) -> Any:
        from rag_model.encoders import EncoderSpec

        return EncoderSpec(model=self.encoder, kind=self.encoder_kind, normalize=self.normalize, chunker=self.chunker)

    def floors(self) -> Any:
        from tasks.validate import ValidationFloors

        return ValidationFloors(
            count_tolerance=self.count_tolerance,
            allow_count_change=self.allow_count_change,
            self_retrieval=self.min_self_retrieval,
            recall_at_10=self.min_recall,
        )

    def parse_workers(self) -> int:
        return self.max_workers or os.cpu_count() or 1

    def result_storage(self) -> Any:
        """Where shard task results persist: inside the store, so a re-run anywhere finds them;
        read back only when they are plain JSON records (flows/results.py).

        Prefect needs a saved block for storage of its own type, named after the store so every run
        against that store shares it.
        """
        from flows.results import JsonOnlyLocalResults, JsonOnlyRemoteResults

        store = self.store()
        base = store.path(RESULTS_DIR)
        if is_local(store.fs):
            block: Any = JsonOnlyLocalResults(basepath=base)
        else:
            settings = {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}} if self.s3_endpoint_url else {}
            block = JsonOnlyRemoteResults(basepath=f"s3://{base}", settings=settings)
        name = "ragindex-results-" + hashlib.sha256(base.encode()).hexdigest()[:12]
        block.save(name, overwrite=True)
        return block

    def task_runner_instance(self) -> Any:
        if self.task_runner == "ray":
            from prefect_ray import RayTaskRunner

            address = None if self.ray_address in (None, "local") else self.ray_address
            return RayTaskRunner(address=address)
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=self.parse_workers())
