"""The small records steps hand each other and leave beside their outputs, as validated models.

A work unit's record (`unit-NNNNNN.json`), the passages summary (`passages/passages.json`), an
embedding shard's sidecar (`embeddings/part-NNNNN.json`) and the record `embed_shard` returns, and
the embeddings summary (`embeddings/embeddings.json`). Steps exchange them as plain JSON-able dicts
(`dump()`: what Prefect persists and caches) and read every one back through `load` or `read`, which
validate, so a torn or foreign record fails with one line naming the file and the field.

Timing keys are `<step>_s`, seconds spent in that step alone.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from storage.errors import RagindexError
from storage.fs import load_json, to_url
from storage.manifest import EncoderFingerprint, PrecisionChoice, SourceDump

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    @classmethod
    def load(cls: type[R], data: Any, where: str = "record") -> R:
        """Validate an in-memory record (a task result, a parsed file)."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
            raise RagindexError(f"{where} is missing or has a bad field: {field}: {problem['msg']}") from None

    @classmethod
    def read(cls: type[R], fs: Any, path: str) -> R:
        """Read and validate a record file (`NotFound` when it is missing)."""
        return cls.load(load_json(fs, path), to_url(fs, path))

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class UnitRecord(Record):
    """What one parse+clean+chunk work unit produced (`tasks.passages.run_unit`)."""

    unit: dict[str, Any]  # the WorkUnit it ran, as a dict: part of its identity
    options: str  # key of the CleanOptions it ran with
    ordinal: int
    path: str  # URL of its Parquet output
    sha256: str | None = None  # of that output as written: a record is trusted only while it matches
    seen: int
    kept: int
    skipped: dict[str, int] = Field(default_factory=dict)
    passages: int
    words: int
    seconds: float


class ShardEntry(Record):
    """One shard as a summary lists it."""

    name: str
    rows: int
    sha256: str


class ArticleCounts(Record):
    seen: int = 0
    kept: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)


class PassagesSummary(Record):
    """`passages/passages.json`: where the passages came from, how many, and the shards."""

    source: SourceDump
    articles: ArticleCounts = Field(default_factory=ArticleCounts)
    passages: int
    words: int = 0
    shards: list[ShardEntry] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


class EmbeddingSidecar(Record):
    """`embeddings/part-NNNNN.json`: what an embedding shard was computed from, and its checksum."""

    passages_sha256: str
    fingerprint_key: str
    rows: int
    dim: int
    encoded: int = 0
    reused: int = 0
    sha256: str


class EmbeddedShard(Record):
    """What `embed_shard` returns for one shard (a Prefect task result)."""

    name: str
    rows: int
    dim: int
    encoded: int
    reused: int
    skipped: bool = False  # already embedded by an earlier run
    sha256: str
    seconds: float
    precision: PrecisionChoice | None = None  # how the encoder ran, where this shard encoded anything


class EmbeddingsSummary(Record):
    """`embeddings/embeddings.json`: the encoder, the paired question encoder, counts and shards."""

    fingerprint: EncoderFingerprint
    question_encoder: str | None = None
    dim: int
    rows: int
    encoded: int = 0
    reused: int = 0
    skipped_shards: int = 0
    shards: list[ShardEntry] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    precision: PrecisionChoice | None = None  # how the encoder ran where it measured a choice
