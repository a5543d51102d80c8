"""Embed passage shards with the frozen document encoder: one .npy (+ sidecar) per passage shard.

Each shard is an independent unit of work (locally in order; `tasks.embed_ray` runs them as one Ray Data
job). A shard whose sidecar already matches the passage shard's sha256 and the encoder fingerprint, and
whose .npy still verifies, is skipped: an interrupted run resumes where it stopped. Vectors of passages whose
content_hash appears in earlier versions under the same fingerprint are copied instead of encoded.

A little over ~400 lines: the shard reader, the reuse lookup with its source verification, the shard
writer and the summary all check the same sidecar and summary records, and splitting them would
spread one resume rule over several modules (the lookup table itself is `tasks.reuse_index`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from rag_model.encoders import (
    DocumentEncoder,
    EncoderSpec,
    fingerprint_of,
    load_document_encoder,
    paired_question_encoder,
)
from rag_model.vectors import read_rows
from storage import layout
from storage.cache import Pins, store_root_url
from storage.errors import Corrupt, RagindexError, first_line
from storage.fs import atomic_write, file_digest, join, load_json
from storage.layout import EMBED_COLUMNS
from storage.location import Location
from storage.manifest import EncoderFingerprint
from storage.names import check_file_name
from storage.records import EmbeddedShard, EmbeddingSidecar, EmbeddingsSummary, PassagesSummary, Record, ShardEntry
from storage.store import IndexStore
from storage.timing import timed
from storage.verify import segment_manifests, signed_manifest
from tasks.chunk import content_hashes
from tasks.progress import Meter, Progress
from tasks.reuse_index import hash_keys, open_source

log = logging.getLogger(__name__)


class EmbedError(RagindexError):
    """Bad passage input or embedding output that cannot be trusted."""


# -- small file helpers --------------------------------------------------------------------------


class _HashingWriter:
    """File wrapper that hashes what passes through, so a big .npy is never held twice in memory."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        mv = memoryview(data).cast("B")
        self.digest.update(mv)
        return self._f.write(mv)


def _read_if_valid(cls: type[Record], fs: Any, path: str) -> Any:
    """A record file, or None when it is missing, torn or foreign (as good as absent: the work is redone)."""
    try:
        return cls.read(fs, path)
    except RagindexError:
        return None


def _write_json(fs: Any, path: str, obj: dict) -> None:
    with atomic_write(fs, path) as f:
        f.write(json.dumps(obj, indent=2).encode())


# -- reading a passage shard -----------------------------------------------------------------------


def _read_hashed(fs: Any, path: str, missing: str) -> tuple[bytes, str]:
    """A file's bytes and their sha256, read once (what is hashed is what is used); `EmbedError(missing)`."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EmbedError(missing) from None
    return data, hashlib.sha256(data).hexdigest()


def read_passage_shard(fs: Any, path: str) -> tuple[pa.Table, str]:
    """The shard's columns embedding needs, and the sha256 of the file as it was read."""
    data, sha = _read_hashed(fs, path, f"passage shard not found: {path}")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise EmbedError(f"passage shard {path} is not a readable Parquet file ({exc})") from None
    for column, typ in EMBED_COLUMNS.items():
        if column not in table.column_names:
            raise EmbedError(f"passage shard {path} has the wrong schema: no column {column!r} "
                             f"(has {', '.join(table.column_names)})")
        if table.schema.field(column).type != typ:
            raise EmbedError(f"passage shard {path} has the wrong schema: column {column!r} is "
                             f"{table.schema.field(column).type}, expected {typ}")
    if table.num_rows == 0:
        raise EmbedError(f"passage shard {path} is empty")
    for column in ("title", "text", "content_hash"):
        if table.column(column).null_count:
            raise EmbedError(f"passage shard {path}: column {column!r} has null values")
    # Vectors are reused by content_hash: one that is not the hash of its row's title and text would give
    # that row another passage's vector (assembly computes them; a shard changed since is refused).
    hashes = content_hashes(table.column("title"), table.column("text"))
    wrong = pc.invert(pc.equal(hashes, table.column("content_hash").combine_chunks()))
    if pc.any(wrong).as_py():
        first = pc.index(wrong, True).as_py()
        raise EmbedError(f"passage shard {path}: row {first} (row_id {table.column('row_id')[first].as_py()}) "
                         f"and {pc.sum(wrong).as_py() - 1} more carry a content_hash that is not the hash of their "
                         "title and text: refusing to embed it")
    return table.select(list(EMBED_COLUMNS)), sha


# -- reuse -----------------------------------------------------------------------------------------


def _source_shards(fs: Any, root: str, key: str) -> list[tuple[str, str]] | None:
    """(passage shard path, embedding .npy path) pairs of an earlier version root, if its vectors
    were made under fingerprint `key`; None when they were not (or it has no embeddings)."""
    summary = _read_if_valid(EmbeddingsSummary, fs, join(root, layout.EMBEDDINGS_DIR, layout.EMBEDDINGS_SUMMARY))
    if summary is None:
        log.info("reuse: %s has no valid %s; not reusing from it", root, layout.EMBEDDINGS_SUMMARY)
        return None
    if summary.fingerprint.key != key:
        log.info("reuse: %s was embedded under another encoder fingerprint; not reusing from it", root)
        return None
    pairs = []
    for shard in summary.shards:
        name = check_file_name(shard.name)
        pairs.append((join(root, layout.PASSAGES_DIR, layout.passage_shard(name)),
                      join(root, layout.EMBEDDINGS_DIR, name)))
    return pairs


def _root_digests(fs: Any, root: str) -> dict[str, str]:
    """relative path -> sha256 of an earlier version root: its manifest's, and for what no manifest
    covers (a plain embed output) the sha256s its passages.json and embeddings.json record for their shards."""
    digests = {}
    for summary_path in (layout.PASSAGES_SUMMARY_PATH, layout.EMBEDDINGS_SUMMARY_PATH):
        folder = summary_path.split("/", 1)[0]
        for shard in _json_or_empty(fs, join(root, summary_path)).get("shards", []):
            if shard.get("name") and shard.get("sha256"):
                digests[f"{folder}/{shard['name']}"] = shard["sha256"]
    digests.update(_json_or_empty(fs, join(root, layout.MANIFEST)).get("files") or {})
    return digests


def _json_or_empty(fs: Any, path: str) -> dict:
    """A summary or manifest as a dict; {} when it is missing or unreadable (nothing is then trusted from it)."""
    try:
        data = load_json(fs, path)
    except RagindexError:
        return {}
    return data if isinstance(data, dict) else {}


def _verified_source(pins: Pins, fs: Any, root: str, path: str, digests: dict[str, str]) -> str | None:
    """A local path holding the bytes a source shard's version names, or None (with one warning) when it
    is corrupt or unrecorded: its passages are then encoded again. Through the local file cache, so an
    unchanged shard is hashed (or, on S3, fetched) once, not on every night that reuses rows of it;
    pinned by `pins` so that no other process evicts it before its rows are read."""
    rel = path[len(root) + 1:]
    try:
        if rel not in digests:
            raise Corrupt(f"{path}: no sha256 recorded for it in {root}")
        return pins.path(fs, path, digests[rel], path)
    except Corrupt as exc:
        log.warning("reuse: %s; encoding its passages again", first_line(exc))
        return None


def _reuse_vectors(hashes: pa.Array, reuse_from: Sequence[Location], key: str,
                   dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows found, their vectors) for a shard's content hashes, from earlier version roots.

    Each earlier version's hash table (tasks.reuse_index: written at build time, or built once per
    process for versions without one) is searched with this shard's sorted hashes, and only the
    rows found are copied. Earlier roots come first-preferred; within a root the first occurrence.
    """
    unique = pc.unique(hashes)
    row_to_unique = pc.index_in(hashes, value_set=unique).to_numpy(zero_copy_only=False)
    keys = hash_keys(unique)
    n_unique = len(unique)
    found = np.zeros(n_unique, dtype=bool)
    vectors = np.zeros((n_unique, dim), dtype=np.float32)
    for where in reuse_from:
        todo = np.flatnonzero(~found)
        if len(todo) == 0:
            break
        source = open_source(where, key, _source_shards)
        if source is None:
            continue
        fs, root = where.fs, where.path
        digests = _root_digests(fs, root)
        shard, row = source.table.lookup(keys[todo])
        pins = where.cache.for_store(store_root_url(where.url)).pins()
        try:
            for s in np.unique(shard[shard >= 0]).tolist():
                npy_path = source.npy_paths[s]
                if npy_path is None:
                    continue
                # Both halves of a source shard must be the bytes its version names: the vectors are
                # copied from the .npy, and the passage shard is what says which passage each row is.
                passages_path = join(root, layout.PASSAGES_DIR, layout.passage_shard(npy_path.rsplit("/", 1)[-1]))
                if _verified_source(pins, fs, root, passages_path, digests) is None:
                    continue
                local = _verified_source(pins, fs, root, npy_path, digests)
                if local is None:
                    continue
                which, rows = todo[shard == s], row[shard == s]
                order = np.argsort(rows, kind="stable")
                which, rows = which[order], rows[order]
                try:
                    vectors[which] = read_rows(LocalFileSystem(), local, rows, dim)
                except RagindexError as exc:
                    raise EmbedError(str(exc)) from None
                found[which] = True
        finally:
            pins.release()
    if n_unique == len(hashes):  # no passage repeated in the shard: rows are already in order, skip a copy
        return found, vectors
    return found[row_to_unique], vectors[row_to_unique]


# -- one shard ---------------------------------------------------------------------------------------


def _existing_matches(fs: Any, npy_path: str, sidecar_path: str, passages_sha: str,
                      key: str) -> EmbeddingSidecar | None:
    sidecar = _read_if_valid(EmbeddingSidecar, fs, sidecar_path)
    if sidecar is None or sidecar.passages_sha256 != passages_sha or sidecar.fingerprint_key != key:
        return None
    try:
        if file_digest(fs, npy_path) != sidecar.sha256:
            return None
    except FileNotFoundError:
        return None
    return sidecar


def embed_shard(passages_shard: Location, out_dir: Location, spec: EncoderSpec, *,
                reuse_from: Sequence[Location] = (), batch_size: int = 64, device: str = "cpu",
                precision: str = "auto", threads: int | None = None, progress: bool = True,
                encoder_calls: Callable[[int], None] | None = None, compile: bool = False,
                on_progress: Callable[[Progress], None] | None = None, progress_every_s: float = 10.0) -> dict:
    """Embed one passage shard into `<out_dir>/<stem>.npy` + `<stem>.json`; returns an `EmbeddedShard` dict.

    `encoder_calls(n)` is called with the size of every batch that actually goes through the
    network, so callers can count encoded passages. `on_progress` gets the encoding's progress (passages
    encoded of those to encode, rate, time left) at most once every `progress_every_s` seconds, for
    callers without a terminal for the tqdm bar. `compile`: see `load_document_encoder`.
    """
    timing: dict[str, float] = {}
    with timed(timing, "seconds"):
        record = _embed_shard(passages_shard, out_dir, spec, reuse_from=reuse_from, batch_size=batch_size,
                              device=device, precision=precision, threads=threads, progress=progress,
                              encoder_calls=encoder_calls, compile=compile,
                              meter=_meter(on_progress, progress_every_s))
    return EmbeddedShard(**record, seconds=timing["seconds"]).dump()


@dataclass
class PreparedShard:
    """A passage shard read, checked and given its reused vectors: what is left is encoding the `todo` rows.

    `done` is the record of a shard an earlier run already embedded (then nothing is left to do).
    """

    name: str  # the passage shard's file name
    table: pa.Table
    passages_sha: str
    key: str
    dim: int
    done: dict | None
    vectors: np.ndarray | None = None  # float32 [rows, dim], filled where not `todo`
    todo: np.ndarray | None = None  # bool [rows]


def prepare_shard(passages_shard: Location, out_dir: Location, spec: EncoderSpec,
                  reuse_from: Sequence[Location]) -> PreparedShard:
    """Read one passage shard, skip it if its output already verifies, else copy the vectors reuse finds."""
    in_fs, in_path = passages_shard.fs, passages_shard.path
    name = check_file_name(in_path.rstrip("/").rsplit("/", 1)[-1])
    if not name.endswith(".parquet"):
        raise EmbedError(f"not a passage shard (expected a .parquet file): {passages_shard}")
    out_fs, out_root = out_dir.fs, out_dir.path
    table, passages_sha = read_passage_shard(in_fs, in_path)
    fingerprint = fingerprint_of(spec)
    key, dim, rows = fingerprint.key, fingerprint.dim, table.num_rows

    done = _existing_matches(out_fs, join(out_root, layout.embedding_shard(name)),
                             join(out_root, layout.sidecar(name)), passages_sha, key)
    if done is not None:
        return PreparedShard(name, table, passages_sha, key, dim, done={
            "name": layout.embedding_shard(name), "rows": done.rows, "dim": done.dim, "encoded": 0, "reused": 0,
            "skipped": True, "sha256": done.sha256})
    vectors = np.empty((rows, dim), dtype=np.float32)
    todo = np.ones(rows, dtype=bool)
    if reuse_from:
        found, reused_vectors = _reuse_vectors(table.column("content_hash").combine_chunks(), reuse_from, key, dim)
        vectors[found] = reused_vectors[found]
        todo = ~found
    return PreparedShard(name, table, passages_sha, key, dim, done=None, vectors=vectors, todo=todo)


def _embed_shard(passages_shard: Location, out_dir: Location, spec: EncoderSpec, *, reuse_from: Sequence[Location],
                 batch_size: int, device: str, precision: str, threads: int | None,
                 progress: bool, encoder_calls: Callable[[int], None] | None, compile: bool,
                 meter: Callable[[int], Meter] | None = None) -> dict:
    shard = prepare_shard(passages_shard, out_dir, spec, reuse_from)
    if shard.done is not None:
        return shard.done
    vectors, table, todo = shard.vectors, shard.table, shard.todo
    n_todo = int(todo.sum())
    measured = None
    if n_todo:
        encoder = load_encoder_checked(spec, shard.dim, shard.key, device=device, precision=precision, threads=threads,
                                       compile=compile)
        idx = np.flatnonzero(todo)
        titles = table.column("title").take(pa.array(idx)).to_pylist()
        texts = table.column("text").take(pa.array(idx)).to_pylist()
        counted = meter(n_todo) if meter is not None else None
        with tqdm(total=n_todo, desc=f"embed {layout.stem(shard.name)}", unit="passage",
                  disable=None if progress else True, leave=False) as bar:
            def on_batch(n: int) -> None:
                bar.update(n)
                if counted is not None:
                    counted.update(n)
                if encoder_calls is not None:
                    encoder_calls(n)

            vectors[idx] = encoder.encode(titles, texts, batch_size=batch_size, on_batch=on_batch)
        measured = encoder.precision_choice.model_dump() if encoder.precision_choice else None
    record = write_embedding_shard(out_dir.fs, out_dir.path, shard.name, vectors, shard.passages_sha, shard.key, n_todo,
                                   spec.model)
    return {**record, "precision": measured}


def _meter(on_progress: Callable[[Progress], None] | None, every_s: float) -> Callable[[int], Meter] | None:
    if on_progress is None:
        return None
    return lambda total: Meter(total, on_progress, every_s)


def load_encoder_checked(spec: EncoderSpec, dim: int, key: str, **options: Any) -> DocumentEncoder:
    """The document encoder for `spec`, refused when its output dim is not the one its fingerprint says, or
    when the weights it loaded are not the ones the shards were planned with (`key`, the fingerprint the
    planner computed: another process, e.g. a Ray actor, may see other files under the same model name)."""
    encoder = load_document_encoder(spec, **options)
    if encoder.fingerprint.key != key:
        raise EmbedError(f"encoder {spec.model} loaded here has fingerprint {encoder.fingerprint.key[:16]}…, "
                         f"the shards were planned with {key[:16]}… (its files differ between processes)")
    if encoder.dim != dim:
        raise EmbedError(f"encoder {spec.model} produced dim {encoder.dim}, its fingerprint says {dim}")
    return encoder


def save_npy(fs: Any, path: str, array: np.ndarray) -> str:
    """Write `array` as .npy (atomically, no pickles); returns the sha256 of the bytes written."""
    with atomic_write(fs, path) as f:
        writer = _HashingWriter(f)
        np.save(writer, array, allow_pickle=False)
    return writer.digest.hexdigest()


def load_npy_verified(fs: Any, path: str, sha256: str, what: str) -> np.ndarray:
    """The .npy at `path`, read once and used only if its bytes hash to `sha256`, the digest its writer
    recorded: data handed from one process to another is checked on arrival (`EmbedError` naming the file)."""
    data, actual = _read_hashed(fs, path, f"{what} {path} is missing")
    if actual != sha256:
        raise EmbedError(f"{what} {path} changed after it was written: sha256 {actual[:16]}…, "
                         f"its writer recorded {sha256[:16]}…")
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_embedding_shard(out_fs: Any, out_root: str, name: str, vectors: np.ndarray, passages_sha: str, key: str,
                          encoded: int, model: str) -> dict:
    """Write passage shard `name`'s vectors (.npy) and then its sidecar; returns the record fields."""
    if not np.isfinite(vectors).all():
        raise EmbedError(f"encoder {model} produced non-finite vectors for {name}")
    rows, dim = vectors.shape
    # .npy first, sidecar last: a crash in between leaves a sidecar that no longer verifies.
    npy_sha = save_npy(out_fs, join(out_root, layout.embedding_shard(name)), vectors)
    sidecar = EmbeddingSidecar(passages_sha256=passages_sha, fingerprint_key=key, rows=rows, dim=dim,
                               encoded=encoded, reused=rows - encoded, sha256=npy_sha)
    _write_json(out_fs, join(out_root, layout.sidecar(name)), sidecar.dump())
    return {"name": layout.embedding_shard(name), "rows": rows, "dim": dim, "encoded": encoded,
            "reused": rows - encoded, "skipped": False, "sha256": npy_sha}


# -- all shards ---------------------------------------------------------------------------------------


def list_passage_shards(passages: Location) -> list[Location]:
    """A passages directory's shards, in order (from passages.json when present)."""
    fs, root = passages.fs, passages.path
    summary = _read_if_valid(PassagesSummary, fs, join(root, layout.PASSAGES_SUMMARY))
    if summary is not None and summary.shards:
        return [passages.child(check_file_name(s.name)) for s in summary.shards]
    try:
        return [passages.sibling(p) for p in layout.passage_shard_paths(fs, root)]
    except RagindexError as exc:
        raise EmbedError(str(exc)) from None


def write_embeddings_summary(out: Location, encoder: EncoderSpec | EncoderFingerprint, shard_records: list[dict],
                             question_encoder: str | None, seconds: float) -> dict:
    """Check every shard on disk agrees (fingerprint, dim, checksum), then write `embeddings.json`.

    The sidecars are read back rather than trusting the records: records may come from cached task
    results of an earlier run, and the summary is what build and reuse trust later. `encoder`: the spec
    the shards were encoded with, or the fingerprint of the version their vectors were copied from.
    """
    if not shard_records:
        raise EmbedError("no embedding shards to summarise")
    fingerprint = encoder if isinstance(encoder, EncoderFingerprint) else fingerprint_of(encoder)
    fs, root = out.fs, out.path
    records = [EmbeddedShard.load(r, "an embedding shard's record") for r in shard_records]
    first: tuple[str, int] | None = None
    for record in records:
        name = check_file_name(record.name)
        sidecar = _read_if_valid(EmbeddingSidecar, fs, join(root, layout.sidecar(name)))
        if sidecar is None:
            raise EmbedError(f"embedding shard {name} has no sidecar in {out}: embed it again")
        dim = sidecar.dim
        if first is None:
            first = (name, dim)
        if dim != first[1]:
            raise EmbedError(f"embedding shard {name} has dim {dim}, but {first[0]} has {first[1]}")
        if dim != fingerprint.dim or sidecar.fingerprint_key != fingerprint.key:
            raise EmbedError(f"embedding shard {name} (dim {dim}) was made by another encoder than "
                             f"{fingerprint.model_id} (dim {fingerprint.dim})")
        if sidecar.sha256 != record.sha256 or sidecar.rows != record.rows:
            raise EmbedError(f"embedding shard {name} changed on disk since it was embedded")
    summary = EmbeddingsSummary(
        fingerprint=fingerprint,
        question_encoder=question_encoder,
        dim=fingerprint.dim,
        rows=sum(r.rows for r in records),
        encoded=sum(r.encoded for r in records),
        reused=sum(r.reused for r in records),
        skipped_shards=sum(1 for r in records if r.skipped),
        shards=[ShardEntry(name=r.name, rows=r.rows, sha256=r.sha256) for r in records],
        timings={"embed_s": round(seconds, 3)},
        # How the encoder ran where it measured a choice (per process: shards of one run agree).
        precision=next((r.precision for r in records if r.precision), None),
    ).dump()
    _write_json(fs, join(root, layout.EMBEDDINGS_SUMMARY), summary)
    return summary


EmbedShards = Callable[..., list[dict]]  # (shards, out, spec, **shard options) -> EmbeddedShard dicts


def embed_passages(passages: Location, out: Location, spec: EncoderSpec, *, reuse_from: Sequence[Location] = (),
                   question_encoder: str | None = None, embed_shards: EmbedShards | None = None,
                   **shard_kwargs: Any) -> dict:
    """Embed every passage shard, then write embeddings.json.

    Locally the shards run one after another; `embed_shards` hands them to another engine instead
    (`tasks.embed_ray.embed_passages_ray` passes its Ray Data job).
    """
    timing: dict[str, float] = {}
    with timed(timing, "embed_s"):
        records = _embed_all(passages, out, spec, reuse_from, embed_shards, shard_kwargs)
        question_encoder = question_encoder or _paired_or_none(spec)
    return write_embeddings_summary(out, spec, records, question_encoder, timing["embed_s"])


def _paired_or_none(spec: EncoderSpec) -> str | None:
    try:
        return paired_question_encoder(spec.model, spec.kind)
    except RagindexError:
        return None  # recorded as unknown; serving then needs one given explicitly


def _embed_all(passages: Location, out: Location, spec: EncoderSpec, reuse_from: Sequence[Location],
               embed_shards: EmbedShards | None, shard_kwargs: dict[str, Any]) -> list[dict]:
    shards = list_passage_shards(passages)
    fingerprint = fingerprint_of(spec)  # fail on a bad model before any work
    kwargs = dict(shard_kwargs, reuse_from=tuple(reuse_from))
    if embed_shards is not None:
        records = embed_shards(shards, out, spec, **kwargs)
    else:
        records = []
        progress = kwargs.get("progress", True)
        for shard in tqdm(shards, desc="embed shards", unit="shard", disable=None if progress else True):
            records.append(embed_shard(shard, out, spec, **kwargs))
    log.info("embedded %d shards with %s: %d encoded, %d reused", len(records), fingerprint.model_id,
             sum(r["encoded"] for r in records), sum(r["reused"] for r in records))
    return records


def _signed_lineage(store: IndexStore, version_id: str) -> bool:
    if store.trusted_keys is None:
        return True
    try:
        segment_manifests(store, signed_manifest(store, version_id))
    except RagindexError as exc:
        log.warning("not reusing the vectors of %s: %s", version_id, first_line(exc))
        return False
    return True


def find_reuse_sources(store: IndexStore, fingerprint: EncoderFingerprint, limit: int = 3) -> list[Location]:
    """Version roots, newest first, of ready versions embedded under the same fingerprint key.

    A delta version's own directory holds only its new rows: the segments it serves follow it, so a
    full build after a week of deltas still reuses the base's vectors. Where the store trusts signing
    keys, only versions whose whole lineage one of them signed are sources: a signing worker must not
    launder vectors planted in an unsigned version into a version it signs."""
    matches = [m for m in reversed(store.list_versions())
               if m.status == "ready" and m.encoder.key == fingerprint.key and _signed_lineage(store, m.version)]
    roots: list[str] = []
    for m in matches[:limit]:
        for version in [m.version, *(s.version for s in reversed(m.segments))]:
            if version not in roots:
                roots.append(version)
    return [store.at(v) for v in roots]
