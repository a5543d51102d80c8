"""Embed passage shards with the frozen document encoder: one .npy (+ sidecar) per passage shard.

Each shard is an independent unit of work (locally in order, or one Ray task each). A shard whose
sidecar already matches the passage shard's sha256 and the encoder fingerprint, and whose .npy still
verifies, is skipped: an interrupted run resumes where it stopped. Vectors of passages whose
content_hash appears in earlier versions under the same fingerprint are copied instead of encoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from rag_model.encoders import EncoderSpec, fingerprint_of, load_document_encoder, paired_question_encoder
from storage.errors import RagindexError
from storage.fs import atomic_write, is_local, join, resolve, to_url
from storage.manifest import EncoderFingerprint
from storage.names import check_file_name
from storage.store import IndexStore

log = logging.getLogger(__name__)

SUMMARY = "embeddings.json"
PASSAGES_SUMMARY = "passages.json"
# The columns embedding reads, with the types the passage-shard contract fixes.
REQUIRED_COLUMNS = {"row_id": pa.int64(), "title": pa.string(), "text": pa.string(), "content_hash": pa.string()}


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


def _sha256_of(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(fs: Any, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn or foreign file is as good as absent: the shard gets redone


def _write_json(fs: Any, path: str, obj: dict) -> None:
    with atomic_write(fs, path) as f:
        f.write(json.dumps(obj, indent=2).encode())


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


# -- reading a passage shard -----------------------------------------------------------------------


def _read_passage_shard(fs: Any, path: str) -> tuple[pa.Table, str]:
    """The shard's columns embedding needs, and the sha256 of the file as it was read."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EmbedError(f"passage shard not found: {path}") from None
    sha = hashlib.sha256(data).hexdigest()
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise EmbedError(f"passage shard {path} is not a readable Parquet file ({exc})") from None
    for column, typ in REQUIRED_COLUMNS.items():
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
    return table.select(list(REQUIRED_COLUMNS)), sha


# -- reuse -----------------------------------------------------------------------------------------


def _source_shards(fs: Any, root: str, key: str) -> list[tuple[str, str]] | None:
    """(passage shard path, embedding .npy path) pairs of an earlier version root, if its vectors
    were made under fingerprint `key`; None when they were not (or it has no embeddings)."""
    summary = _read_json(fs, join(root, "embeddings", SUMMARY))
    if not summary:
        log.info("reuse: %s has no %s; not reusing from it", root, SUMMARY)
        return None
    try:
        their_key = EncoderFingerprint.model_validate(summary["fingerprint"]).key
    except (KeyError, ValueError):
        return None
    if their_key != key:
        log.info("reuse: %s was embedded under another encoder fingerprint; not reusing from it", root)
        return None
    pairs = []
    for shard in summary.get("shards", []):
        name = check_file_name(shard["name"])
        pairs.append((join(root, "passages", _stem(name) + ".parquet"), join(root, "embeddings", name)))
    return pairs


def _read_rows(fs: Any, path: str, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows `rows` (sorted) of a float32 .npy: memory-mapped locally, ranged reads elsewhere."""
    if is_local(fs):
        arr = np.load(path, mmap_mode="r")
        _check_npy(arr.shape, arr.dtype, dim, path)
        return np.asarray(arr[rows], dtype=np.float32)
    with fs.open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        _check_npy(shape, dtype, dim, path)
        if fortran:
            raise EmbedError(f"{path}: Fortran-ordered arrays are not embedding shards")
        offset = f.tell()
        row_bytes = dim * 4
        out = np.empty((len(rows), dim), dtype=np.float32)
        # Coalesce runs of consecutive rows into one ranged read each.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        start = 0
        for end in [*breaks.tolist(), len(rows)]:
            first, count = int(rows[start]), end - start
            f.seek(offset + first * row_bytes)
            out[start:end] = np.frombuffer(f.read(count * row_bytes), dtype=dtype).reshape(count, dim)
            start = end
        return out


def _check_npy(shape: tuple, dtype: np.dtype, dim: int, path: str) -> None:
    if len(shape) != 2 or shape[1] != dim or np.dtype(dtype) != np.float32:
        raise EmbedError(f"{path}: expected float32 [rows, {dim}], found {np.dtype(dtype)} {list(shape)}")


def _reuse_vectors(hashes: pa.Array, reuse_from: Sequence[str], key: str, dim: int,
                   s3_endpoint_url: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows found, their vectors) for a shard's content hashes, from earlier version roots.

    Streams the earlier versions one passage shard at a time (only its content_hash column), so
    memory stays at one shard's hashes however large the earlier versions are; stops early once
    every hash is found. Earlier roots come first-preferred.
    """
    unique = pc.unique(hashes)
    row_to_unique = pc.index_in(hashes, value_set=unique).to_numpy(zero_copy_only=False)
    n_unique = len(unique)
    src_shard = np.full(n_unique, -1, dtype=np.int64)  # index into `sources`
    src_row = np.zeros(n_unique, dtype=np.int64)
    sources: list[tuple[Any, str]] = []
    remaining = n_unique
    for url in reuse_from:
        fs, root = resolve(url, s3_endpoint_url)
        pairs = _source_shards(fs, root, key)
        for passages_path, npy_path in pairs or ():
            try:
                column = pq.read_table(passages_path, columns=["content_hash"], filesystem=fs).column(0)
            except (FileNotFoundError, pa.ArrowInvalid, OSError, KeyError) as exc:
                log.warning("reuse: cannot read %s (%s); skipping it", passages_path, exc)
                continue
            hit = pc.fill_null(pc.index_in(column, value_set=unique), -1).to_numpy(zero_copy_only=False)
            found_rows = np.flatnonzero(hit >= 0)
            if len(found_rows) == 0:
                continue
            targets = hit[found_rows].astype(np.int64)
            fresh = src_shard[targets] == -1
            found_rows, targets = found_rows[fresh], targets[fresh]
            # The same hash twice in one source shard: keep its first row.
            targets, first = np.unique(targets, return_index=True)
            found_rows = found_rows[first]
            if len(targets) == 0:
                continue
            src_shard[targets] = len(sources)
            src_row[targets] = found_rows
            sources.append((fs, npy_path))
            remaining -= len(targets)
            if remaining == 0:
                break
        if remaining == 0:
            break

    vectors = np.zeros((n_unique, dim), dtype=np.float32)
    for i, (fs, npy_path) in enumerate(sources):
        which = np.flatnonzero(src_shard == i)
        order = np.argsort(src_row[which])
        which = which[order]
        vectors[which] = _read_rows(fs, npy_path, src_row[which], dim)
    found_unique = src_shard >= 0
    return found_unique[row_to_unique], vectors[row_to_unique]


# -- one shard ---------------------------------------------------------------------------------------


def _existing_matches(fs: Any, npy_path: str, sidecar_path: str, passages_sha: str, key: str) -> dict | None:
    sidecar = _read_json(fs, sidecar_path)
    if not sidecar or sidecar.get("passages_sha256") != passages_sha or sidecar.get("fingerprint_key") != key:
        return None
    try:
        if _sha256_of(fs, npy_path) != sidecar.get("sha256"):
            return None
    except FileNotFoundError:
        return None
    return sidecar


def embed_shard(passages_shard_url: str, out_dir_url: str, spec: EncoderSpec, *, reuse_from: Sequence[str] = (),
                batch_size: int = 64, device: str = "cpu", precision: str = "auto", threads: int | None = None,
                s3_endpoint_url: str | None = None, progress: bool = True,
                encoder_calls: Callable[[int], None] | None = None) -> dict:
    """Embed one passage shard into `<out_dir>/<stem>.npy` + `<stem>.json`; returns a small record.

    `encoder_calls(n)` is called with the size of every batch that actually goes through the
    network, so callers can count encoded passages.
    """
    started = time.perf_counter()
    in_fs, in_path = resolve(passages_shard_url, s3_endpoint_url)
    name = check_file_name(in_path.rstrip("/").rsplit("/", 1)[-1])
    if not name.endswith(".parquet"):
        raise EmbedError(f"not a passage shard (expected a .parquet file): {passages_shard_url}")
    stem = _stem(name)
    out_fs, out_root = resolve(out_dir_url, s3_endpoint_url)
    npy_path = join(out_root, stem + ".npy")
    sidecar_path = join(out_root, stem + ".json")

    table, passages_sha = _read_passage_shard(in_fs, in_path)
    fingerprint = fingerprint_of(spec)
    key, dim, rows = fingerprint.key, fingerprint.dim, table.num_rows

    done = _existing_matches(out_fs, npy_path, sidecar_path, passages_sha, key)
    if done is not None:
        return {"name": stem + ".npy", "rows": done["rows"], "dim": done["dim"], "encoded": 0, "reused": 0,
                "skipped": True, "sha256": done["sha256"], "seconds": time.perf_counter() - started}

    vectors = np.empty((rows, dim), dtype=np.float32)
    todo = np.ones(rows, dtype=bool)
    if reuse_from:
        found, reused_vectors = _reuse_vectors(table.column("content_hash").combine_chunks(), reuse_from, key,
                                               dim, s3_endpoint_url)
        vectors[found] = reused_vectors[found]
        todo = ~found
    n_todo = int(todo.sum())
    measured = None
    if n_todo:
        encoder = load_document_encoder(spec, device=device, precision=precision, threads=threads)
        if encoder.dim != dim:
            raise EmbedError(f"encoder {spec.model} produced dim {encoder.dim}, its fingerprint says {dim}")
        idx = np.flatnonzero(todo)
        titles = table.column("title").take(pa.array(idx)).to_pylist()
        texts = table.column("text").take(pa.array(idx)).to_pylist()
        with tqdm(total=n_todo, desc=f"embed {stem}", unit="passage", disable=None if progress else True,
                  leave=False) as bar:
            def on_batch(n: int) -> None:
                bar.update(n)
                if encoder_calls is not None:
                    encoder_calls(n)

            vectors[idx] = encoder.encode(titles, texts, batch_size=batch_size, on_batch=on_batch)
        measured = encoder.precision_choice.model_dump() if encoder.precision_choice else None
    if not np.isfinite(vectors).all():
        raise EmbedError(f"encoder {spec.model} produced non-finite vectors for {name}")

    # .npy first, sidecar last: a crash in between leaves a sidecar that no longer verifies.
    with atomic_write(out_fs, npy_path) as f:
        writer = _HashingWriter(f)
        np.save(writer, vectors, allow_pickle=False)
    npy_sha = writer.digest.hexdigest()
    record = {"passages_sha256": passages_sha, "fingerprint_key": key, "rows": rows, "dim": dim,
              "encoded": n_todo, "reused": rows - n_todo, "sha256": npy_sha}
    _write_json(out_fs, sidecar_path, record)
    return {"name": stem + ".npy", "rows": rows, "dim": dim, "encoded": n_todo, "reused": rows - n_todo,
            "skipped": False, "sha256": npy_sha, "seconds": time.perf_counter() - started, "precision": measured}


# -- all shards ---------------------------------------------------------------------------------------


def list_passage_shards(passages_url: str, s3_endpoint_url: str | None = None) -> list[str]:
    """URLs of a passages directory's shards, in order (from passages.json when present)."""
    fs, root = resolve(passages_url, s3_endpoint_url)
    summary = _read_json(fs, join(root, PASSAGES_SUMMARY))
    if summary and summary.get("shards"):
        names = [check_file_name(s["name"]) for s in summary["shards"]]
    else:
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except FileNotFoundError:
            raise EmbedError(f"passages directory not found: {passages_url}") from None
        names = [n for n in names if n.startswith("part-") and n.endswith(".parquet")]
    if not names:
        raise EmbedError(f"no passage shards (part-*.parquet) in {passages_url}")
    return [to_url(fs, join(root, n)) for n in names]


def write_embeddings_summary(out_url: str, spec: EncoderSpec, shard_records: list[dict], question_encoder: str | None,
                             seconds: float, s3_endpoint_url: str | None = None) -> dict:
    """Check every shard on disk agrees (fingerprint, dim, checksum), then write `embeddings.json`.

    The sidecars are read back rather than trusting the records: records may come from cached task
    results of an earlier run, and the summary is what build and reuse trust later.
    """
    if not shard_records:
        raise EmbedError("no embedding shards to summarise")
    fingerprint = fingerprint_of(spec)
    fs, root = resolve(out_url, s3_endpoint_url)
    first: tuple[str, int] | None = None
    for record in shard_records:
        name = check_file_name(record["name"])
        sidecar = _read_json(fs, join(root, _stem(name) + ".json"))
        if sidecar is None:
            raise EmbedError(f"embedding shard {name} has no sidecar in {out_url}: embed it again")
        dim = sidecar.get("dim")
        if first is None:
            first = (name, dim)
        if dim != first[1]:
            raise EmbedError(f"embedding shard {name} has dim {dim}, but {first[0]} has {first[1]}")
        if dim != fingerprint.dim or sidecar.get("fingerprint_key") != fingerprint.key:
            raise EmbedError(f"embedding shard {name} (dim {dim}) was made by another encoder than "
                             f"{spec.model} (dim {fingerprint.dim})")
        if sidecar.get("sha256") != record["sha256"] or sidecar.get("rows") != record["rows"]:
            raise EmbedError(f"embedding shard {name} changed on disk since it was embedded")
    summary = {
        "fingerprint": fingerprint.model_dump(mode="json"),
        "question_encoder": question_encoder,
        "dim": fingerprint.dim,
        "rows": sum(r["rows"] for r in shard_records),
        "encoded": sum(r["encoded"] for r in shard_records),
        "reused": sum(r["reused"] for r in shard_records),
        "skipped_shards": sum(1 for r in shard_records if r.get("skipped")),
        "shards": [{"name": r["name"], "rows": r["rows"], "sha256": r["sha256"]} for r in shard_records],
        "timings": {"embed_s": round(seconds, 3)},
        # How the encoder ran where it measured a choice (per process: shards of one run agree).
        "precision": next((r["precision"] for r in shard_records if r.get("precision")), None),
    }
    _write_json(fs, join(root, SUMMARY), summary)
    return summary


def _ray_embed(shards: list[str], out_url: str, spec: EncoderSpec, ray_address: str,
               shard_kwargs: dict) -> list[dict]:
    """One Ray task per shard on an existing cluster (or a local one for 'local'); GPU where there is one."""
    import ray

    if not ray.is_initialized():
        if ray_address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=ray_address, log_to_driver=False)
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    kwargs = dict(shard_kwargs, progress=False)
    if has_gpu:
        kwargs["device"] = "cuda"
        remote = ray.remote(num_gpus=1)(embed_shard)
    else:
        # One CPU per task; Ray sets each worker's thread count to match, so tasks don't fight.
        remote = ray.remote(num_cpus=1)(embed_shard)
    refs = [remote.remote(s, out_url, spec, **kwargs) for s in shards]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if isinstance(cause, RagindexError):
            raise type(cause)(str(cause)) from None
        raise EmbedError(f"a Ray embedding task failed: {_first_line(cause or exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def embed_passages(passages_url: str, out_url: str, spec: EncoderSpec, *, reuse_from: Sequence[str] = (),
                   ray_address: str | None = None, question_encoder: str | None = None, **shard_kwargs: Any) -> dict:
    """Embed every passage shard (locally in order, or as Ray tasks), then write embeddings.json."""
    started = time.perf_counter()
    s3 = shard_kwargs.get("s3_endpoint_url")
    shards = list_passage_shards(passages_url, s3)
    fingerprint = fingerprint_of(spec)  # fail on a bad model before any work
    if question_encoder is None:
        try:
            question_encoder = paired_question_encoder(spec.model, spec.kind)
        except RagindexError:
            question_encoder = None  # recorded as unknown; serving then needs one given explicitly
    kwargs = dict(shard_kwargs, reuse_from=tuple(reuse_from))
    if ray_address:
        records = _ray_embed(shards, out_url, spec, ray_address, kwargs)
    else:
        records = []
        progress = kwargs.get("progress", True)
        for shard in tqdm(shards, desc="embed shards", unit="shard", disable=None if progress else True):
            records.append(embed_shard(shard, out_url, spec, **kwargs))
    log.info("embedded %d shards with %s: %d encoded, %d reused", len(records), fingerprint.model_id,
             sum(r["encoded"] for r in records), sum(r["reused"] for r in records))
    return write_embeddings_summary(out_url, spec, records, question_encoder, time.perf_counter() - started, s3)


def find_reuse_sources(store: IndexStore, fingerprint: EncoderFingerprint, limit: int = 3) -> list[str]:
    """Version roots (URLs), newest first, of ready versions embedded under the same fingerprint key."""
    matches = [m for m in reversed(store.list_versions())
               if m.status == "ready" and m.encoder.key == fingerprint.key]
    return [store.version_url(m.version) for m in matches[:limit]]

