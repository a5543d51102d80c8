"""The Prefect tasks of `refresh-index`: thin wrappers around the plain functions in `tasks/`.

Each takes locations and small records and returns the same, so results stay small and cacheable.
Shard tasks (parse-unit, embed-shard) are cached on their inputs plus the code version, and persist
JSON-only results (flows.results) in the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from flows.params import RefreshParams
from flows.report import emit_promoted
from flows.results import RESULT_SERIALIZER
from rag_model.encoders import EncoderSpec
from storage.denylist import denied_page_ids
from storage.location import Location
from storage.manifest import IndexInfo, Manifest
from tasks import assemble_version, delta_version, download, embed, embed_ray, incr_dumps, passages, promote
from tasks.progress import Progress

T = TypeVar("T")

CODE_VERSION = "ragindex-1"  # bump when a change alters passages or vectors for the same input
SHARD_CACHE = INPUTS + TASK_SOURCE


# -- tasks: thin Prefect wrappers around the plain functions in tasks/ -----------------------------
# Network trouble is retried once, inside tasks.download (backoff, and Range requests that resume a
# transfer); the Prefect tasks do not retry on top of that.


@task(name="resolve-dump")
def resolve_dump_task(p: RefreshParams) -> download.DumpRef:
    if p.source:
        return download.resolve_source(p.source, s3_endpoint_url=p.s3_endpoint_url, wiki=p.source_wiki,
                                       date=p.source_date)
    return download.resolve_dump(p.wiki, p.dump_date, mirror=p.mirror, user_agent=p.user_agent)


@task(name="download")
def download_task(ref: download.DumpRef, p: RefreshParams) -> list[str]:
    return download.download_dump(ref, p.store(), user_agent=p.user_agent, progress=False,
                                  allow_unverified=p.allow_unverified)


@task(name="parse-unit", cache_policy=SHARD_CACHE, persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1)
def parse_unit_task(unit: passages.WorkUnit, work_dir: Location, input_id: str, code_version: str,
                    chunker: str = "dpr") -> dict:
    # input_id and code_version are not used in the body: they are part of the cache key.
    return passages.run_unit(unit, work_dir, chunker=chunker)


@task(name="assemble-passages")
def assemble_task(results: list[dict], out: Location, ref: download.DumpRef, p: RefreshParams) -> dict:
    source = ref.source()
    return passages.assemble(results, out, source, shard_rows=p.shard_rows,
                             denied=denied_page_ids(p.store(), source.wiki))


@dataclass(frozen=True)
class EmbedProgress:
    """Where embedding reports its progress: the run's log, and a progress artifact that covers `shards`
    shards of which this embeds number `shard`: the run's (`artifact_id`), or one made at the first report."""

    artifact_id: Any
    shard: int
    shards: int
    every_s: float

    def reporter(self, label: str) -> Callable[[Progress], None]:
        artifact = [self.artifact_id]

        def report(progress: Progress) -> None:
            get_run_logger().info("embedding %s: %s", label, progress.describe("passages"))
            if artifact[0] is None:  # made only once there is something to show (a delta may encode nothing)
                artifact[0] = create_progress_artifact(0.0, description=f"embedding {label}")
            update_progress_artifact(artifact[0], progress=100.0 * (self.shard + progress.fraction) / self.shards)

        return report


@task(name="embed-shard", cache_policy=SHARD_CACHE - "progress", persist_result=True,
      result_serializer=RESULT_SERIALIZER, retries=1)
def embed_shard_task(
    shard: Location,
    shard_sha256: str,
    out_dir: Location,
    spec: EncoderSpec,
    fingerprint_key: str,
    reuse_from: list[Location],
    batch_size: int,
    precision: str,
    code_version: str,
    compile: bool = False,
    progress: EmbedProgress | None = None,
) -> dict:
    # shard_sha256, fingerprint_key and code_version are not used in the body: they are part of the cache key;
    # progress is not (where a run reports to does not change the vectors).
    return embed.embed_shard(
        shard, out_dir, spec, reuse_from=reuse_from, batch_size=batch_size, precision=precision, progress=False,
        compile=compile, on_progress=progress.reporter(shard.name) if progress else None,
        progress_every_s=progress.every_s if progress else 10.0,
    )


@task(name="embed-ray-data")
def embed_ray_task(shards: list[Location], out_dir: Location, spec: EncoderSpec, reuse_from: list[Location],
                   p: RefreshParams) -> list[dict]:
    # Not cached per shard: each shard's sidecar is its resume point (finished shards are skipped).
    return embed_ray.embed_shards_ray(shards, out_dir, spec, ray_address=p.ray_address or "local",
                                      reuse_from=reuse_from, batch_size=p.batch_size, precision=p.precision,
                                      progress=False)


@task(name="build-index")
def build_index_task(version_id: str, p: RefreshParams) -> IndexInfo:
    """index.faiss and passages.arrow, by the same function `ragindex build` uses."""
    return assemble_version.build_version_files(
        p.store(), version_id, spec=p.index_spec, memory_budget=p.memory_budget_bytes, progress=False,
    )


@task(name="validate")
def validate_task(version_id: str, index_info: IndexInfo, timings: dict[str, float], p: RefreshParams) -> Manifest:
    return assemble_version.finish_version(p.store(), version_id, index_info, p.floors(), timings=timings,
                                           canaries=p.canaries)


@task(name="promote")
def promote_task(version_id: str, p: RefreshParams, reason: str, planned_generation: int) -> dict[str, str]:
    """An automatic promote (`tasks.promote.promote_planned`): `{"status", "reason"}`, status `promoted`, or
    why not (`conflict`, `held`, `older`) as an outcome rather than a failed task: a refresh that leaves
    CURRENT alone on purpose still finished its work."""
    store = p.store()
    try:
        pointer = promote.promote_planned(store, version_id, planned_generation=planned_generation,
                                          allow_older=p.allow_older, actor="refresh-index", reason=reason)
    except promote.NotPromoted as exc:
        get_run_logger().warning("%s", exc)
        return {"status": exc.status, "reason": str(exc)}
    emit_promoted(pointer, store.url)
    return {"status": "promoted", "reason": reason}


# -- adds-changes days: delta versions ---------------------------------------------------------------


@task(name="resolve-days")
def resolve_days_task(p: RefreshParams, after: str) -> incr_dumps.IncrChain:
    return incr_dumps.pending_days(p.mirror, p.wiki, after=after, user_agent=p.user_agent)


@task(name="download-day")
def download_day_task(day: incr_dumps.IncrDay, p: RefreshParams) -> str:
    return incr_dumps.download_day(day, p.store(), user_agent=p.user_agent, progress=False)


class FlowSteps(delta_version.DeltaSteps):
    """The steps of a refresh run, named and timed (`storage.timing.Steps`); each step of a delta version
    runs as a Prefect task `delta-<step>`, so the run's page shows every step, its time and the one that
    failed. Not cached and not retried: a step's inputs are the staging version it
    writes into, which a failed run removes."""

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self(name):
            return task(fn, name=f"delta-{name.replace('_', '-')}", cache_policy=NO_CACHE)(*args, **kwargs)
