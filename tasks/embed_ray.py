"""Embed passage shards as one Ray Data job: the distributed path behind `--ray-address` and `task_runner=ray`.

The driver (`ragindex embed`, or the refresh flow's one embed task) first does per shard what the local
path does (`tasks.embed.prepare_shard`): a shard whose .npy + sidecar already verify is skipped, and the
vectors of unchanged passages are copied by content hash. What is left becomes one Dataset: the row ids of the
passage shards still to do, read by Ray (`read_parquet`), cut down to the rows that need encoding, grouped
by shard and handed to `ShardEncoder`, a callable class run by an actor pool: the encoder is loaded once per
actor, one GPU per actor on a cluster that has GPUs, one CPU per actor otherwise.

A shard reaches the encoder whole and in row order (`groupby("shard").map_groups`, not fixed-size
`map_batches` batches). That is what makes the vectors byte-identical to the local path: in fp32 a
vector's last bits depend on which passages share its forward pass (padding width, batch shape), and
the encoder's own length-bucketed batching over one shard's rows is exactly what the local path runs.
The actor writes its shard with the local path's writer (.npy, then the sidecar, each atomic), so a job
that fails part way leaves every finished shard to be skipped by the next run.

Reused vectors of a partly reused shard wait for its actor in `<out>/_ray/` (in the store, so an actor on
another node can read them); the directory is removed when the job ends.

Nothing the driver hands an actor through files is trusted unchecked: the plan carries the sha256 of the
passage shard the driver planned from and of the vectors it staged (recorded as it wrote them), and the
fingerprint key of the encoder (which covers the weights' sha256). The actor reads the passage shard
itself and encodes the text of those verified bytes (Ray's read only says which rows), loads the staged
vectors only if they hash to the recorded digest, and refuses an encoder whose fingerprint differs; a
mismatch fails the job with one line naming the file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_model.encoders import EncoderSpec
from storage import layout
from storage.errors import RagindexError, first_line
from storage.fs import is_local, join
from storage.location import Location
from tasks.embed import (
    EmbedError,
    embed_passages,
    load_encoder_checked,
    load_npy_verified,
    prepare_shard,
    read_passage_shard,
    save_npy,
    write_embedding_shard,
)

log = logging.getLogger(__name__)

# What the encoder sees of a passage shard, and what the rows of the Dataset carry to it.
_READ_COLUMNS = ["row_id"]
_TODO_SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int64())])


@dataclass(frozen=True)
class ShardPlan:
    """What an actor needs to finish one passage shard (small: it travels to every actor)."""

    name: str  # the passage shard's file name
    path: str  # its path in the passages filesystem
    first_row_id: int  # row_id of its row 0 (row_ids run on without gaps inside a shard)
    rows: int
    encode: int  # how many of its rows need the encoder
    passages_sha: str
    key: str  # encoder fingerprint key
    dim: int
    staged: bool  # some rows were reused: their vectors wait in the staging directory
    source: Location  # the passage shard, which the actor reads and checks against `passages_sha`
    staged_sha: str | None = None  # sha256 of the staged vectors, recorded as the driver wrote them


def staged_path(out_root: str, name: str) -> str:
    return join(out_root, layout.RAY_STAGING_DIR, layout.embedding_shard(name))


def plan_shards(shards: Sequence[Location], out: Location, spec: EncoderSpec,
                reuse_from: Sequence[Location]) -> tuple[list[dict | ShardPlan], dict[str, np.ndarray]]:
    """Per shard, in order: its record when nothing is left to encode (done earlier, or all reused and
    written here), else the plan of its Ray work, with its reused vectors staged for the actor.

    Also the rows to encode of each partly reused shard (a planned shard absent there has all its rows
    encoded): kept beside the plans rather than in them, since the plans go to every actor.
    """
    out_fs, out_root = out.fs, out.path
    planned: list[dict | ShardPlan] = []
    todo_rows: dict[str, np.ndarray] = {}
    for where in shards:
        start = time.perf_counter()
        shard = prepare_shard(where, out, spec, reuse_from)
        n_todo = 0 if shard.done is not None else int(shard.todo.sum())
        if shard.done is not None or n_todo == 0:
            record = shard.done or write_embedding_shard(out_fs, out_root, shard.name, shard.vectors,
                                                         shard.passages_sha, shard.key, 0, spec.model)
            planned.append({**record, "seconds": time.perf_counter() - start})
            continue
        row_ids = shard.table.column("row_id").to_numpy()
        first = int(row_ids[0])
        if not np.array_equal(row_ids, first + np.arange(len(row_ids))):
            raise EmbedError(f"passage shard {shard.name}: row_id does not run on from {first} without gaps, "
                             "so its rows cannot be matched back to their order")
        staged = n_todo < len(row_ids)
        staged_sha = save_npy(out_fs, staged_path(out_root, shard.name), shard.vectors) if staged else None
        planned.append(ShardPlan(name=shard.name, path=where.path, first_row_id=first, rows=len(row_ids),
                                 encode=n_todo, passages_sha=shard.passages_sha, key=shard.key, dim=shard.dim,
                                 staged=staged, source=where, staged_sha=staged_sha))
        if staged:
            todo_rows[shard.name] = np.flatnonzero(shard.todo).astype(np.int64)
    return planned, todo_rows


def keep_todo(batch: pa.Table, first_row_id: dict[str, int], todo_rows: dict[str, np.ndarray]) -> pa.Table:
    """The rows of a batch of passage rows that need encoding, as (shard, row in shard).

    A batch may hold rows of more than one shard; `path` (from read_parquet) names each row's shard.
    """
    paths = batch.column("path")
    parts = []
    for path in pc.unique(paths).to_pylist():
        rows_of = batch.filter(pc.equal(paths, path))
        name = path.rsplit("/", 1)[-1]
        row = rows_of.column("row_id").to_numpy() - first_row_id[name]
        keep = np.isin(row, todo_rows[name]) if name in todo_rows else np.ones(len(row), dtype=bool)
        parts.append(pa.table({"shard": pa.array([name] * int(keep.sum()), pa.string()), "row": row[keep]},
                              schema=_TODO_SCHEMA))
    return pa.concat_tables(parts) if parts else _TODO_SCHEMA.empty_table()


class ShardEncoder:
    """The callable class of the job: one per actor, the encoder loaded once; each call is all the rows of
    one shard that need encoding, and writes that shard."""

    def __init__(self, spec: EncoderSpec, plans: dict[str, ShardPlan], out: Location, batch_size: int,
                 device: str, precision: str, threads: int | None) -> None:
        self.spec = spec
        self.plans = plans
        self.out_fs, self.out_root = out.fs, out.path
        self.batch_size = batch_size
        first = next(iter(plans.values()))
        self.encoder = load_encoder_checked(spec, first.dim, first.key, device=device, precision=precision,
                                            threads=threads)

    def __call__(self, group: pa.Table) -> pa.Table:
        start = time.perf_counter()
        names = pc.unique(group.column("shard")).to_pylist()
        if len(names) != 1:
            raise EmbedError(f"one encoder call got rows of {len(names)} shards ({', '.join(names)}), expected 1")
        plan = self.plans[names[0]]
        group = group.sort_by("row")
        rows = group.column("row").to_numpy()
        if len(rows) != plan.encode or len(np.unique(rows)) != len(rows):
            # A shard split across calls would be encoded in other batches than the local path uses.
            raise EmbedError(f"shard {plan.name}: got {len(rows)} rows to encode in one call, expected {plan.encode}")
        table, passages_sha = read_passage_shard(plan.source.fs, plan.source.path)
        if passages_sha != plan.passages_sha or table.num_rows != plan.rows:
            raise EmbedError(f"passage shard {plan.source} changed after it was planned: sha256 "
                             f"{passages_sha[:16]}…, the driver planned from {plan.passages_sha[:16]}…")
        if plan.staged:
            vectors = load_npy_verified(self.out_fs, staged_path(self.out_root, plan.name), plan.staged_sha or "",
                                        "staged vectors")
        else:
            vectors = np.empty((plan.rows, plan.dim), dtype=np.float32)
        take = pa.array(rows)
        vectors[rows] = self.encoder.encode(table.column("title").take(take).to_pylist(),
                                            table.column("text").take(take).to_pylist(), batch_size=self.batch_size)
        record = write_embedding_shard(self.out_fs, self.out_root, plan.name, vectors, plan.passages_sha, plan.key,
                                       len(rows), self.spec.model)
        record["seconds"] = time.perf_counter() - start
        return pa.table({"record": [json.dumps(record)]})


def connect(ray_address: str) -> None:
    """Join the cluster at `ray_address` (`auto`, `ray://host:port`, `host:port`), or start one here for
    `local`; a Ray already initialised in this process (prefect-ray's task runner) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    if ray_address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=ray_address, log_to_driver=False)


def _pyarrow_fs(fs: Any) -> Any:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem() if is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _run_job(plans: list[ShardPlan], todo_rows: dict[str, np.ndarray], passages_fs: Any, spec: EncoderSpec,
             out: Location, options: dict[str, Any], progress: bool) -> list[dict]:
    import ray
    import ray.data

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        per_actor, pool, options = {"num_gpus": 1}, gpus, {**options, "device": "cuda"}
    else:
        # One CPU per actor (Ray sets its torch threads to match); one CPU is left to reading and shuffling.
        per_actor, pool = {"num_cpus": 1}, max(1, int(resources.get("CPU", 1)) - 1)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    ds = ray.data.read_parquet([p.path for p in plans], filesystem=_pyarrow_fs(passages_fs), columns=_READ_COLUMNS,
                               include_paths=True, partitioning=None)
    ds = ds.map_batches(keep_todo, batch_format="pyarrow",
                        fn_kwargs={"first_row_id": {p.name: p.first_row_id for p in plans}, "todo_rows": todo_rows})
    ds = ds.groupby("shard", num_partitions=len(plans)).map_groups(
        ShardEncoder, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(pool, len(plans))),
        fn_constructor_kwargs={"spec": spec, "plans": {p.name: p for p in plans}, "out": out, **options},
        **per_actor,
    )
    return [json.loads(row["record"]) for row in ds.take_all()]


def _user_error(exc: BaseException) -> RagindexError | None:
    """Our own error inside a failed Ray job (Ray wraps it in its task and user-code errors), if any."""
    from ray.exceptions import RayError

    seen: BaseException | None = exc
    for _ in range(32):
        if seen is None:
            return None
        if isinstance(seen, RagindexError) and not isinstance(seen, RayError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return None


def embed_shards_ray(shards: Sequence[Location], out: Location, spec: EncoderSpec, *, ray_address: str,
                     reuse_from: Sequence[Location] = (), batch_size: int = 64, device: str = "cpu",
                     precision: str = "auto", threads: int | None = None, progress: bool = True) -> list[dict]:
    """Embed `shards` into `out` as one Ray Data job; returns their `EmbeddedShard` dicts, in order.

    `device` is used where the cluster has no GPU; with GPUs every actor takes one and runs on CUDA.
    """
    try:
        import ray.data  # noqa: F401  (Ray Data needs pandas besides ray itself)
    except ImportError as exc:
        raise EmbedError(f"--ray-address needs Ray Data, which is not installed ({first_line(exc)}): "
                         "install ragindex[ray]") from None
    planned, todo_rows = plan_shards(shards, out, spec, reuse_from)
    plans = [p for p in planned if isinstance(p, ShardPlan)]
    out_fs, out_root = out.fs, out.path
    done: dict[str, dict] = {}
    if plans:
        connect(ray_address)
        options = {"batch_size": batch_size, "device": device, "precision": precision, "threads": threads}
        try:
            records = _run_job(plans, todo_rows, shards[0].fs, spec, out, options, progress)
        except Exception as exc:
            mine = _user_error(exc)
            if mine is not None:
                raise type(mine)(str(mine)) from None
            raise EmbedError(f"the Ray Data embedding job failed: {first_line(exc)}") from None
        finally:
            staging = join(out_root, layout.RAY_STAGING_DIR)
            if out_fs.exists(staging):
                out_fs.rm(staging, recursive=True)
        done = {r["name"]: r for r in records}
        missing = [p.name for p in plans if layout.embedding_shard(p.name) not in done]
        if missing:
            raise EmbedError(f"the Ray Data job returned no record for {', '.join(missing)}")
    log.info("Ray Data job: %d shards encoded, %d already done or fully reused", len(plans),
             len(planned) - len(plans))
    return [done[layout.embedding_shard(p.name)] if isinstance(p, ShardPlan) else p for p in planned]


def embed_passages_ray(passages: Location, out: Location, spec: EncoderSpec, *, ray_address: str,
                       **options: Any) -> dict:
    """`tasks.embed.embed_passages` with the shards embedded as one Ray Data job on `ray_address`."""
    return embed_passages(passages, out, spec, embed_shards=partial(embed_shards_ray, ray_address=ray_address),
                          **options)
