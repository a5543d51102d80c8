"""The manifest: what a version is made of, written last so that its presence means "complete".

Schema-versioned pydantic models. Storage knows nothing of FAISS or models; the encoder and index
sections are plain records filled in by the tasks that own those things.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class DumpFile(BaseModel):
    name: str
    sha1: str | None = None
    size: int | None = None


class SourceDump(BaseModel):
    wiki: str
    dump_date: str
    location: str | None = None  # mirror URL, file:// or s3:// it was read from
    files: list[DumpFile] = Field(default_factory=list)


class EncoderFingerprint(BaseModel):
    """Identifies the exact document encoder that produced a version's vectors."""

    model_config = ConfigDict(frozen=True)

    model_id: str
    revision: str | None = None
    weights_sha256: str
    dim: int
    pooling: Literal["pooler", "mean", "cls", "max"]
    normalize: bool = False
    max_length: int
    kind: Literal["dpr", "mean"]
    # How articles were cut into passages (tasks.chunk.CHUNKERS). Part of the key although a passage's vector
    # does not depend on it: vectors are reused by the key, and a delta must chunk like its lineage, so two
    # chunkers never mix in one store's lineage or reuse.
    chunker: str = "dpr"

    @property
    def key(self) -> str:
        """Short stable id of everything that changes the vectors (not where the model was read from), and of
        the chunker. `dpr` chunking is left out of the hashed fields, so keys from before chunkers stay valid."""
        relevant = self.model_dump(exclude={"model_id", "revision"} | ({"chunker"} if self.chunker == "dpr" else set()))
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class PrecisionChoice(BaseModel):
    """The numeric precision the document encoder ran in, and the probe measurements that chose it.

    Deliberately outside EncoderFingerprint.key: a reduced precision is used only when its vectors
    stay within a cosine tolerance of fp32, so they are interchangeable with fp32 ones, and the
    choice depends on the machine's measured speed: keying on it would make reuse and up-to-date
    checks depend on which host (or how loaded a host) ran the embed.
    """

    requested: str  # auto / fp32 / bf16 / fp16 / int8
    chosen: str  # fp32 / bf16 / bf16-autocast / fp16 / fp16-autocast / int8
    cosine: float  # mean cosine of the chosen variant's probe vectors to fp32's
    passages_per_s: dict[str, float] = Field(default_factory=dict)  # every measured candidate, on the probe
    cosines: dict[str, float] = Field(default_factory=dict)


class IndexInfo(BaseModel):
    spec: str  # what was asked: flat / hnsw / ivfpq / ivfsq / auto / a factory string
    factory: str  # the faiss factory string that was built
    metric: Literal["ip", "l2"] = "ip"
    dim: int  # dimension of the stored index (dim + 1 for the hnsw inner-product trick)
    params: dict[str, Any] = Field(default_factory=dict)  # build parameters (M, nlist, ...)
    search_params: dict[str, Any] = Field(default_factory=dict)  # nprobe / efSearch tuned for recall
    phi: float | None = None  # hnsw trick: max squared norm; queries get a 0 extra dimension
    bytes: int = 0


class Validation(BaseModel):
    passed: bool
    reason: str | None = None  # one readable line when it failed
    checks: dict[str, Any] = Field(default_factory=dict)


class SegmentRef(BaseModel):
    """Rows a delta version shares with an ancestor: the files of `version`'s own directory.

    `manifest_sha256` pins the exact manifest (and so, through its `files`, every byte) the delta was
    built on; row ids `first_row_id` .. `first_row_id + rows - 1` are that version's own rows."""

    version: str
    manifest_sha256: str
    first_row_id: int
    rows: int


class AppliedDay(BaseModel):
    """One adds-changes day folded into a delta version."""

    date: str
    maxrevid: int
    file: str
    md5: str


class StreamPosition(BaseModel):
    """How far a lineage has applied the live streams (EventStreams): the SSE id of the last event read, a
    JSON list of {topic, partition, offset | timestamp} that resumes the next read as `Last-Event-ID`."""

    last_event_id: str
    newest_event: str  # meta.dt of the newest event read, ISO-8601 UTC


class Lineage(BaseModel):
    """Where a version's knowledge comes from: a full dump, then the adds-changes days applied since, and
    the live streams up to `stream` (carried forward by every later delta of the lineage)."""

    base_version: str  # the full version the chain of deltas starts at
    base_dump: str  # that version's dump date
    days: list[AppliedDay] = Field(default_factory=list)  # every day applied since the base, in order
    stream: StreamPosition | None = None

    @property
    def watermark(self) -> str:
        """The newest date this lineage has seen: adds-changes days after it are still to apply."""
        return self.days[-1].date if self.days else self.base_dump

    def describe(self) -> str:
        """`dump 20240101`, or `dump 20240101 + 2 days to 20240104`: what the lineage knows, in words."""
        live = f" + live to {self.stream.newest_event}" if self.stream else ""
        if not self.days:
            return f"dump {self.base_dump}{live}"
        return (f"dump {self.base_dump} + {len(self.days)} day{'s' if len(self.days) != 1 else ''} to "
                f"{self.watermark}{live}")

    @property
    def content(self) -> Content:
        """What a delta of this lineage knows (see `Content`)."""
        return Content.delta(self.base_version, [(d.date, d.maxrevid) for d in self.days],
                             stream=self.stream.last_event_id if self.stream else None)


class Content(BaseModel):
    """What a version knows, whatever its id: two versions with equal Content serve the same knowledge.

    A delta: its lineage's base version and the adds-changes days applied to it, each by date and
    maxrevid (the base pins the dump, the encoder and the index spec), and the live streams' position it
    applied. A full version: the sha1 of
    each of its dump's files, its encoder fingerprint key and its index spec. This is how a run
    recognises content it already built (and must not build again), or that a rollback holds.
    """

    model_config = ConfigDict(frozen=True)

    base_version: str | None = None
    days: tuple[tuple[str, int], ...] = ()
    stream: str | None = None  # a delta's live stream position (the SSE id it applied up to)
    dump_sha1: tuple[str, ...] = ()
    encoder_key: str | None = None
    index_spec: str | None = None

    @classmethod
    def full(cls, dump_sha1: Iterable[str], encoder_key: str, index_spec: str) -> Content:
        return cls(dump_sha1=tuple(sorted(dump_sha1)), encoder_key=encoder_key, index_spec=index_spec)

    @classmethod
    def delta(cls, base_version: str, days: Iterable[tuple[str, int]], stream: str | None = None) -> Content:
        return cls(base_version=base_version, days=tuple(days), stream=stream)


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    version: str
    status: Literal["ready", "rejected"]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    parent: str | None = None
    source: SourceDump
    encoder: EncoderFingerprint
    question_encoder: str | None = None  # id or path of the question encoder paired with `encoder`
    precision: PrecisionChoice | None = None  # how `encoder` ran (not part of its fingerprint)
    index: IndexInfo
    counts: dict[str, int] = Field(default_factory=dict)
    skipped: dict[str, int] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256
    timings: dict[str, float] = Field(default_factory=dict)  # step -> seconds
    validation: Validation | None = None
    # Delta versions (tasks.delta_version): the ancestors' rows this version serves besides its own, the
    # first row id of its own rows, and its lineage. A full version has no segments and starts at row 0.
    segments: list[SegmentRef] = Field(default_factory=list)
    first_row_id: int = 0
    lineage: Lineage | None = None
    changes: dict[str, Any] = Field(default_factory=dict)  # what a delta added/changed/moved/dropped
    # A compaction (tasks.compact_version): the delta whose segments this version merges (all of them, or
    # those above the base: then the base is its one segment). It has that delta's lineage: it knows what
    # the delta knows.
    compacted_from: str | None = None
    # What made a delta other than adds-changes days: "takedown" (tasks.takedown), whose only change is
    # tombstoning the rows of pages taken down.
    kind: str | None = None

    @property
    def is_delta(self) -> bool:
        return bool(self.segments)

    @property
    def effective_lineage(self) -> Lineage:
        """Where this version's knowledge comes from; a full version is the base of its own lineage."""
        return self.lineage or Lineage(base_version=self.version, base_dump=self.source.dump_date)

    @property
    def mode(self) -> str:
        """`full`, `delta`, the kind of delta (`takedown`), or `compaction`: what a UI shows a version as."""
        if self.compacted_from:
            return "compaction"
        return self.kind or ("delta" if self.is_delta else "full")

    @property
    def content(self) -> Content:
        if self.lineage is not None:  # a delta, or a compaction of one: the knowledge of its lineage
            return self.lineage.content
        return Content.full([f.sha1 or "" for f in self.source.files], self.encoder.key, self.index.spec)

    def as_segment(self, manifest_sha256: str) -> SegmentRef:
        """This version's own rows as a segment of a child delta, pinned by the sha256 of its stored manifest."""
        return SegmentRef(version=self.version, manifest_sha256=manifest_sha256, first_row_id=self.first_row_id,
                          rows=self.counts.get("passages", 0))

    @property
    def live_passages(self) -> int:
        """Rows this version serves: its own plus its ancestors' not tombstoned."""
        return self.counts.get("live_passages", self.counts.get("passages", 0))

    @property
    def next_row_id(self) -> int:
        """The first row id a child delta gives its own rows (row ids are never reused in a lineage)."""
        return self.first_row_id + self.counts.get("passages", 0)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class Pointer(BaseModel):
    """The content of CURRENT."""

    version: str
    previous: str | None = None
    generation: int
    updated_at: datetime


class HistoryEntry(BaseModel):
    generation: int
    action: Literal["promote", "rollback", "takedown"]  # takedown: the promote of a takedown version
    from_version: str | None
    to_version: str
    actor: str
    reason: str | None = None
    at: datetime
