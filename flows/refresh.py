"""The `refresh-index` flow: dump -> passages -> embeddings -> index -> validate -> promote.

The flow only composes the plain functions in `tasks/`; every task hands the next one a location or
a small record. Shard tasks (one per parse unit, one per embedding shard) are cached on their inputs
(the input's checksum, the parameters and the code version) with results persisted in the store,
and a re-run of a crashed build resumes into the same staging version, so nothing finished is
computed twice. With `task_runner=ray` the embedding is one task that runs one Ray Data job
(`tasks.embed_ray`); there each shard's sidecar, not a task cache, is what a re-run resumes from.

A run may be killed at any moment; the next one finishes the same version. A cached result is
trusted only while the files it names still hold the sha256 it carries (else that unit or shard is
computed again), half-written temp files of the killed run are removed from the staging version
before it is resumed, and a committed version whose promote never happened is promoted (the rule:
`promote_unfinished`).

Every promote is automatic (`tasks.promote.promote_planned`): a compare-and-swap on the generation of
CURRENT the run planned from, refused while a rollback hold is active, and refused for knowledge older
than CURRENT's unless `allow_older`. A run that leaves CURRENT alone on purpose says why in its status:
`held` (the run succeeds), `conflict` and `older` (the run fails with that one line, after its report).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.params import RefreshParams
from flows.refresh_delta import ModePlan, catch_up, choose_mode, current_version, held_outcome, run_delta
from flows.refresh_live import run_live
from flows.refresh_tasks import (
    CODE_VERSION,
    EmbedProgress,
    FlowSteps,
    assemble_task,
    build_index_task,
    download_task,
    embed_ray_task,
    embed_shard_task,
    parse_unit_task,
    promote_task,
    resolve_dump_task,
    validate_task,
)
from flows.report import RefreshOutcome, write_report
from flows.settings import load_settings
from rag_model.encoders import fingerprint_of, paired_question_encoder
from storage import layout
from storage.errors import Conflict, RagindexError, Rejected, first_line
from storage.fs import file_digest, join, remove_inside
from storage.location import Location
from storage.manifest import Content
from storage.names import check_file_name
from storage.pointer import delete_json
from storage.records import EmbeddedShard, EmbeddingSidecar, PassagesSummary
from storage.store import IndexStore
from storage.timing import timed
from tasks import download, embed, passages
from tasks.newer_states import keep_newer_states
from tasks.promote import owed_promote
from tasks.validation_floors import DEFAULT_COUNT_TOLERANCE, DEFAULT_MIN_RECALL, DEFAULT_MIN_SELF_RETRIEVAL

# -- the flow ------------------------------------------------------------------------------------


@flow(name="refresh-index", log_prints=True, validate_parameters=True)
def refresh_index(
    wiki: str | None = None,
    dump_date: str | None = None,
    source: str | None = None,
    store_url: str | None = None,
    mirror: str | None = None,
    encoder: str | None = None,
    encoder_kind: str | None = None,
    normalize: bool | None = None,
    question_encoder: str | None = None,
    index_spec: str | None = None,
    memory_budget: str | None = None,
    min_recall: float = DEFAULT_MIN_RECALL,
    min_self_retrieval: float = DEFAULT_MIN_SELF_RETRIEVAL,
    count_tolerance: float = DEFAULT_COUNT_TOLERANCE,
    allow_count_change: bool = False,
    canaries: str | None = None,
    promote: bool = True,
    force: bool = False,
    resume: bool = False,
    allow_older: bool = False,
    allow_unverified: bool = False,
    task_runner: str = "threads",
    ray_address: str | None = None,
    shard_rows: int = layout.DEFAULT_SHARD_ROWS,
    batch_size: int = 64,
    precision: str = "auto",
    compile: bool = False,
    max_workers: int | None = None,
    mode: str = "auto",
    streams_url: str | None = None,
    api_url: str | None = None,
    chunker: str | None = None,
) -> dict:
    """Refresh the index from a Wikipedia dump; promote the new version if it validates.

    `mode` auto (the nightly run): a full dump newer than the serving lineage's base is built in
    full; otherwise the finished adds-changes days after the lineage's watermark become one delta
    version; otherwise the run is up to date. `full` / `incremental` force one of the two. `live` applies
    the EventStreams changes since the serving lineage's stream position as one micro-delta
    (`flows.refresh_live`; `streams_url` / `api_url` default to RAGINDEX_STREAMS_URL / RAGINDEX_API_URL).

    While a rollback hold is active (any rollback makes one), the run promotes nothing: the content rolled
    back from is not built again (status `held`), new content is built and validated and kept unpromoted
    (status `held`). `resume` releases every hold first, as `ragindex resume` does. A version whose
    knowledge is older than CURRENT's (its dump, or newest applied day) is built and kept, not promoted
    (status `older`, the run fails), unless `allow_older`; in auto mode the days after such a full dump
    are applied on top of it first, and that delta is promoted (`refresh_delta.catch_up`). A run whose
    CURRENT moved while it built does not promote (status `conflict`, the run fails).

    `chunker` (RAGINDEX_CHUNKER): how articles become passages (`tasks.chunk.CHUNKERS`); it is part of the
    encoder fingerprint, so a delta on a lineage of the other chunker is refused.

    Every parameter left empty takes its value from the `RAGINDEX_*` settings. Bad parameters
    fail here, before any work starts, with one readable line.
    """
    settings = load_settings()
    p = RefreshParams.from_flow(settings, **{k: v for k, v in locals().items() if k != "settings"})
    runner = p.task_runner_instance()
    # The report is written here, so it is attached to the run the user triggered (the build runs as a
    # subflow only to choose its task runner), whether the build succeeded or failed.
    try:
        outcome = build_version_flow.with_options(task_runner=runner)(p)
    except StepFailed as exc:
        write_report(exc.outcome)
        raise
    write_report(RefreshOutcome(**outcome))
    if outcome["status"] == "rejected":
        raise Rejected(f"version {outcome['version']} rejected: {outcome['reason']}")
    if outcome["status"] == "conflict":
        raise Conflict(outcome["reason"])
    if outcome["status"] == "older":
        raise Rejected(outcome["reason"])
    return outcome


class StepFailed(RagindexError):
    """A refresh failed; the message names the step, and CURRENT was left as it was. `outcome` is what the
    run report says of it."""

    def __init__(self, message: str, outcome: RefreshOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@flow(name="build-version", log_prints=True)
def build_version_flow(p: RefreshParams) -> dict:
    steps = FlowSteps()
    try:
        outcome = _build_version(p, steps)
    except Exception as exc:
        step = steps.current or "resolve"
        failed = RefreshOutcome(status="failed", version=None, reason=first_line(exc), timings=steps.timings,
                                failed_step=step)
        raise StepFailed(f"refresh-index failed in step '{step}': {first_line(exc)}", failed) from exc
    return asdict(outcome)


def _build_version(p: RefreshParams, steps: FlowSteps) -> RefreshOutcome:
    store = p.store()
    released = store.release_holds(actor="refresh-index", reason="resume=true") if p.resume else []
    for hold in released:
        get_run_logger().info("released %s", hold.describe())
    with timed(steps.timings, "total_s"):
        with steps("resolve"):
            plan = choose_mode(p, store)
        if plan.mode == "live":
            outcome = run_live(p, steps, store, plan)
        elif plan.mode != "full":
            outcome = run_delta(p, steps, store, plan)
        else:
            with steps("resolve"):
                published = resolve_dump_task(p)
                fingerprint = fingerprint_of(p.encoder_spec())
                # The nightly run must be cheap when nothing changed: decide before downloading anything.
                dump_sha1 = dump_identity(published, p.s3_endpoint_url)
                # Record the identity in the manifest too, so that the next run can recognise this dump.
                ref = replace(published, files=[replace(f, sha1=sha1)
                                                for f, sha1 in zip(published.files, dump_sha1, strict=True)])
                content = Content.full(dump_sha1, fingerprint.key, p.index_spec)
                held = held_outcome(store, content, f"the dump {ref.wiki} {ref.dump_date} with this encoder and "
                                    "index spec (not built again)", dump=ref.source().model_dump())
                existing = store.ready_with(content)
            if held is not None:
                outcome = held
            elif existing and not p.force:
                outcome = _existing(p, steps, store, existing.version, ref, plan)
            else:
                with steps("download"):
                    # Verified against what the source published: a sha1 computed above needs no second pass.
                    files = download_task(published, p)
                outcome = _build(p, steps, store, ref, files, dump_sha1, plan)
            if outcome.status == "older":
                outcome = catch_up(p, steps, store, plan, outcome)
    outcome.timings = steps.timings
    outcome.holds = [h.describe() for h in store.holds()]
    outcome.released_holds = [h.describe() for h in released]
    return outcome


def _existing(p: RefreshParams, steps: FlowSteps, store: IndexStore, version_id: str,
              ref: download.DumpRef, plan: ModePlan) -> RefreshOutcome:
    """A ready version already holds this dump, encoder and index spec: promote it if it is still owed
    its promote (`promote_unfinished`), else the run is up to date."""
    holds = f"version {version_id} already holds this dump, encoder and index spec"
    owed = owed_promote(store, version_id)
    if owed and p.promote:
        with steps.holding("lock", store.build_lock(owner=f"refresh-index:promote:{version_id}")):
            # Again, under the lock: another run may have finished it meanwhile.
            if owed_promote(store, version_id):
                # A kill inside commit_version, after the manifest, leaves the staging marker beside it.
                delete_json(store.fs, store.version_path(version_id, layout.STAGING_MARKER))
                with steps("promote"):
                    done = promote_task(version_id, p, planned_generation=plan.generation,
                                        reason=f"refresh-index: {ref.wiki} {ref.dump_date}, unfinished promote")
                outcome = RefreshOutcome(status="promoted", version=version_id, reason=holds,
                                         dump=ref.source().model_dump())
                outcome.settle(done, f"{holds} and is owed its promote: promoted it")
                outcome.current = current_version(store)
                return outcome
    current = current_version(store)
    if current != version_id:
        holds += ("; not promoted (promote=false)" if owed else
                  f"; CURRENT is {current}, which replaced it on purpose, so it is not promoted again")
    return RefreshOutcome(status="up-to-date", version=version_id, current=current, reason=holds,
                          dump=ref.source().model_dump())


def _build(p: RefreshParams, steps: FlowSteps, store: IndexStore, ref: download.DumpRef, files: list[str],
           dump_sha1: list[str], plan: ModePlan) -> RefreshOutcome:
    logger = get_run_logger()
    spec = p.encoder_spec()
    fingerprint = fingerprint_of(spec)
    build_key = _build_key(dump_sha1, fingerprint.key, p)
    with steps.holding("lock", store.build_lock(owner=f"refresh-index:{build_key[:12]}")):
        version_id = _resume_or_begin(store, ref, build_key)
        logger.info("building version %s (build key %s)", version_id, build_key[:12])
        results_at = p.result_storage()

        # parse + chunk: one cached task per unit, in parallel
        with steps("passages"):
            units = passages.plan_units([store.location.reach(f) for f in files], workers=p.parse_workers())
            work_dir = store.at(version_id, layout.WORK_DIR)
            progress = create_progress_artifact(0.0, description=f"parse + chunk of {len(units)} units")
            parse_one = parse_unit_task.with_options(result_storage=results_at)

            def parse(i: int, refresh: bool = False) -> Any:
                runs = parse_one.with_options(refresh_cache=True) if refresh else parse_one
                unit = units[i]
                return runs.submit(unit, work_dir, _unit_input_id(unit.url, files, dump_sha1), CODE_VERSION,
                                   p.chunker)

            futures = [parse(i) for i in range(len(units))]
            unit_results = _gather(futures, progress, lambda r: passages.unit_output_intact(r, work_dir),
                                   lambda i: parse(i, refresh=True))
            passages_at = store.at(version_id, layout.PASSAGES_DIR)
            # Never backwards: what CURRENT's lineage (live runs, nightly days) knows past this dump wins.
            current = store.current()
            newer = keep_newer_states(store, store.manifest(current.version) if current else None, ref.wiki,
                                      unit_results, work_dir)
            summary = PassagesSummary.load(assemble_task(newer.records, passages_at, ref, p), "passages summary")

        # embed: one cached task per shard (or one Ray Data job), reusing vectors of unchanged passages
        with steps("embed"):
            reuse_from = embed.find_reuse_sources(store, fingerprint)
            embeddings_at = store.at(version_id, layout.EMBEDDINGS_DIR)
            if p.task_runner == "ray":
                # One task, run here (the job's driver), submits one Ray Data job for the version's shards.
                records = embed_ray_task([passages_at.child(shard.name) for shard in summary.shards],
                                         embeddings_at, spec, reuse_from, p)
                shard_records = [EmbeddedShard.load(r, "embedding shard record") for r in records]
                resumed = [r.skipped for r in shard_records]
            else:
                progress = create_progress_artifact(0.0, description=f"embedding {len(summary.shards)} shards")
                embed_one = embed_shard_task.with_options(result_storage=results_at)

                def embed_at(i: int, refresh: bool = False) -> Any:
                    runs = embed_one.with_options(refresh_cache=True) if refresh else embed_one
                    shard = summary.shards[i]
                    return runs.submit(
                        passages_at.child(shard.name), shard.sha256, embeddings_at, spec, fingerprint.key,
                        reuse_from, p.batch_size, p.precision, CODE_VERSION, p.compile,
                        EmbedProgress(progress, i, len(summary.shards), p.progress_seconds),
                    )

                futures = []
                for i in range(len(summary.shards)):
                    fut = embed_at(i)
                    # torch already uses every core for one shard; shards side by side only thrash.
                    fut.result()  # stop at the first failed shard: a re-run resumes from there
                    futures.append(fut)
                results = _gather(futures, progress,
                                  lambda r: _shard_output_intact(r, embeddings_at),
                                  lambda i: embed_at(i, refresh=True))
                shard_records = [EmbeddedShard.load(r, "embedding shard record") for r in results]
                resumed = [_cached(f) for f in futures]
        question = p.question_encoder or paired_question_encoder(spec.model, spec.kind)
        embed.write_embeddings_summary(embeddings_at, spec, [r.dump() for r in shard_records], question,
                                       steps.timings["embed_s"])

        with steps("build"):
            index_info = build_index_task.submit(version_id, p).result()
        with steps("validate"):
            _remove_work_dir(store, version_id)
            manifest = validate_task(version_id, index_info, dict(steps.timings), p)

    fresh = [r for r, done in zip(shard_records, resumed, strict=True) if not done]
    counts = {
        **manifest.counts,
        "shards": len(shard_records),
        "shards_resumed": len(shard_records) - len(fresh),
        "encoded_this_run": sum(r.encoded for r in fresh if not r.skipped),
        "kept_newer_pages": newer.kept_newer,
        "kept_removed_pages": newer.kept_removed,
    }
    outcome = RefreshOutcome.from_manifest(manifest, counts=counts, dump=ref.source().model_dump())
    if outcome.status == "built" and p.promote:
        with steps("promote"):
            outcome.settle(promote_task(version_id, p, reason=f"refresh-index: {ref.wiki} {ref.dump_date}",
                                        planned_generation=plan.generation), "validation passed")
    elif outcome.status == "built":
        outcome.reason = "validation passed; not promoted (promote=false)"
    outcome.current = current_version(store)
    return outcome


# -- helpers -------------------------------------------------------------------------------------


def dump_identity(ref: download.DumpRef, s3_endpoint_url: str | None) -> list[str]:
    """The sha1 of each dump file, in order: the mirror's where it published one, else computed
    (a local or S3 source). Keys the up-to-date check and the shard caches."""
    return [f.sha1 or download.sha1_of(f.url, s3_endpoint_url=s3_endpoint_url) for f in ref.files]


def _unit_input_id(url: str, files: list[str], dump_sha1: list[str]) -> str:
    return dump_sha1[files.index(url)] if url in files else url


def _build_key(dump_sha1: list[str], fingerprint_key: str, p: RefreshParams) -> str:
    blob = json.dumps(
        {"dump": sorted(dump_sha1), "encoder": fingerprint_key, "spec": p.index_spec,
         "shard_rows": p.shard_rows, "code": CODE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _resume_or_begin(store: IndexStore, ref: download.DumpRef, build_key: str) -> str:
    """The staging version a crashed run of the same build left behind, else a new one."""
    version_id, resumed = store.resume_or_begin(ref.wiki, ref.dump_date, build_key)
    if resumed:
        get_run_logger().info("resuming staging version %s left by an earlier run", version_id)
    return version_id


def _remove_work_dir(store: IndexStore, version_id: str) -> None:
    remove_inside(store.fs, store.root, store.version_path(version_id, layout.WORK_DIR))


def _gather(futures: list, progress_id: Any, intact: Callable[[dict], bool], redo: Callable[[int], Any]) -> list[dict]:
    """The futures' results, in order. A cached result is trusted only if `intact` says the files it
    names still hold what it records; otherwise `redo(i)` computes it again (replacing the cache
    entry) and its future takes the old one's place in `futures`."""
    results = []
    for i, fut in enumerate(futures):
        result = fut.result()
        if _cached(fut) and not intact(result):
            get_run_logger().warning("a cached result of %s names files that are gone or changed; computing it again",
                                     fut.task_run_id)
            futures[i] = fut = redo(i)
            result = fut.result()
        results.append(result)
        update_progress_artifact(progress_id, progress=100.0 * (i + 1) / len(futures))
    return results


def _cached(fut: Any) -> bool:
    return fut.state.name == "Cached"


def _shard_output_intact(record: dict, embeddings: Location) -> bool:
    """Whether an embedding shard's record still describes the store: its .npy has the record's sha256,
    and so does the sidecar beside it (which the embeddings summary is written from)."""
    try:
        shard = EmbeddedShard.load(record, "embedding shard record")
        name = check_file_name(shard.name)
        fs, root = embeddings.fs, embeddings.path
        sidecar = EmbeddingSidecar.read(fs, join(root, layout.sidecar(name)))
        return sidecar.sha256 == shard.sha256 and file_digest(fs, join(root, name)) == shard.sha256
    except (RagindexError, FileNotFoundError):
        return False
