"""What a nightly refresh does, decided each night by itself, and the delta path of `refresh-index`.

The serving lineage is CURRENT's: its base full dump and the adds-changes days applied since
(`Manifest.lineage`). Each run, in auto mode: a finished full dump newer than that base means a
full build (which reuses the embeddings of unchanged passages); otherwise every finished
adds-changes day after the lineage's watermark, up to the first unfinished one, becomes one delta
version on top of CURRENT (`tasks.delta_version`); otherwise the run is up to date. `full` and
`incremental` force a mode. A named dump (`source`, or a date other than `latest`) is always a full build.

The plan records CURRENT's generation; every promote of the run is a compare-and-swap on it
(`tasks.promote.promote_planned`), so a rollback, or any move of CURRENT, during the build wins and the
run's version is kept unpromoted. Content that an active rollback hold covers (the same days on the
same base, or the same dump, encoder and index spec) is neither built nor promoted again; new content
is built and validated but waits, unpromoted, until the operator releases the holds (`ragindex resume`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prefect import get_run_logger

from flows.params import RefreshParams
from flows.refresh_tasks import EmbedProgress, FlowSteps, download_day_task, promote_task, resolve_days_task
from flows.report import RefreshOutcome
from storage.errors import NotFound, RagindexError, Rejected, first_line
from storage.manifest import Content, Manifest, Pointer
from storage.store import IndexStore
from storage.timing import Steps
from tasks import download
from tasks.compact_version import CompactionPolicy, compact_version
from tasks.delta_version import NothingToApply, build_delta_version
from tasks.incr_dumps import IncrChain
from tasks.promote import held_reason, owed_promote


@dataclass
class ModePlan:
    mode: Literal["full", "delta", "live", "up-to-date"]
    reason: str
    parent: Manifest | None = None
    chain: IncrChain | None = None
    generation: int = 0  # CURRENT's when the run planned: what every promote of the run swaps on
    # A nightly full build of a dump newer than the lineage's base: if it knows less than CURRENT (the
    # lineage has applied days past the dump's date), the days after it are applied on top (`catch_up`).
    catch_up: bool = False


def choose_mode(p: RefreshParams, store: IndexStore) -> ModePlan:
    pointer = store.current()
    plan = _choose(p, store, pointer)
    plan.generation = pointer.generation if pointer else 0
    return plan


def _choose(p: RefreshParams, store: IndexStore, pointer: Pointer | None) -> ModePlan:
    named = bool(p.source) or p.dump_date != "latest"
    if named or p.mode == "full":
        if p.mode in ("incremental", "live"):
            raise Rejected(f"--{p.mode} applies changes to CURRENT: it cannot be combined with --source, --date "
                           "or --full")
        return ModePlan("full", "a dump was named" if named else "a full build was asked for")
    parent = store.manifest(pointer.version) if pointer else None
    if p.mode == "live":
        if parent is None or parent.source.wiki != p.wiki:
            raise Rejected(f"nothing of {p.wiki} is serving yet: a live run needs a full build to start from")
        return ModePlan("live", f"the live changes after {parent.effective_lineage.describe()}", parent=parent)
    if parent is None or parent.source.wiki != p.wiki:
        if p.mode == "incremental":
            raise Rejected(f"nothing of {p.wiki} is serving yet: a delta needs a full build to start from")
        return ModePlan("full", f"nothing of {p.wiki} is serving yet")
    lineage = parent.effective_lineage
    if p.mode == "auto":
        try:
            full = download.resolve_dump(p.wiki, "latest", mirror=p.mirror, user_agent=p.user_agent)
        except NotFound:
            full = None
        if full is not None and full.dump_date > lineage.base_dump:
            return ModePlan("full", f"full dump {full.dump_date} is newer than the serving lineage's base "
                                    f"{lineage.base_dump}", catch_up=True)
    try:
        chain = resolve_days_task(p, lineage.watermark)
    except NotFound as exc:
        if p.mode == "incremental":
            raise
        # A mirror without adds-changes days: the full path decides (up to date, or a promote still owed).
        return ModePlan("full", f"no adds-changes days: {exc}")
    stop = f"; {chain.stop_reason}" if chain.stopped_at else ""
    if chain.days:
        dates = f"{chain.days[0].date}..{chain.days[-1].date}" if len(chain.days) > 1 else chain.days[0].date
        return ModePlan("delta", f"{len(chain.days)} adds-changes day(s) {dates} after {lineage.watermark}{stop}",
                        parent=parent, chain=chain)
    if p.mode == "auto" and parent.lineage is None:  # a full version, not a delta or a compaction of one
        return ModePlan("full", f"no finished adds-changes day after {lineage.watermark}{stop}")
    return ModePlan("up-to-date", f"no finished adds-changes day after {lineage.watermark}{stop}", parent=parent)


def catch_up(p: RefreshParams, steps: FlowSteps, store: IndexStore, plan: ModePlan,
             older: RefreshOutcome) -> RefreshOutcome:
    """A nightly full build refused as `older`: full dumps finish days after their date, while the nightly
    kept applying adds-changes days past it. The finished days after the dump become one delta on the new
    full version, and that delta, which knows as much as CURRENT or more, is what the run promotes (on
    the generation it planned from). Without such days the run stays `older`."""
    base = store.manifest(older.version) if older.version else None
    if not plan.catch_up or base is None:
        return older
    try:
        chain = resolve_days_task(p, base.source.dump_date)
    except NotFound:
        return older
    if not chain.days:
        return older
    reason = f"full dump {base.source.dump_date} caught up with the adds-changes days to {chain.days[-1].date}"
    # catch_up: the days are recorded even where the full build already kept the lineage's newer revisions
    # of every page they touch (`keep_newer_states`), so the version knows the days and is not older.
    caught = run_delta(p, steps, store, ModePlan("delta", reason, parent=base, chain=chain,
                                                 generation=plan.generation, catch_up=True))
    return older if caught.status == "up-to-date" else caught


def held_outcome(store: IndexStore, content: Content, subject: str, **fields: Any) -> RefreshOutcome | None:
    """A run whose content an active rollback hold covers ends here, before it downloads or builds anything:
    status `held`, naming the version rolled back from (while it exists)."""
    active = store.holds()
    hold = next((h for h in reversed(active) if h.content == content), None)
    if hold is None:
        return None
    return RefreshOutcome(status="held", version=hold.left if store.has_version(hold.left) else None,
                          current=current_version(store), reason=held_reason(subject, content, active),
                          lineage=hold.lineage.model_dump() if hold.lineage else None, **fields)


def current_version(store: IndexStore) -> str | None:
    pointer = store.current()
    return pointer.version if pointer else None


def run_delta(p: RefreshParams, steps: FlowSteps, store: IndexStore, plan: ModePlan) -> RefreshOutcome:
    """Download the plan's days, build, validate and (unless promote=false) promote one delta version."""
    parent = plan.parent
    current = parent.version if parent else None
    if plan.mode == "up-to-date" or plan.chain is None or parent is None:
        return RefreshOutcome(status="up-to-date", version=current, current=current, reason=plan.reason,
                              mode="delta", lineage=parent.effective_lineage.model_dump() if parent else None)
    days = plan.chain.days
    lineage = parent.effective_lineage
    # Same base, same days (by maxrevid): the same content, whichever parent or id it was built under.
    content = Content.delta(lineage.base_version, [(d.date, d.maxrevid) for d in [*lineage.days, *days]],
                            stream=lineage.content.stream)
    dates = ", ".join(d.date for d in [*lineage.days, *days])
    held = held_outcome(store, content, f"the days {dates} on {lineage.base_version} (not built again)",
                        mode="delta")
    if held is not None:
        return held
    existing = store.ready_with(content)
    if existing is not None:
        return existing_delta(p, store, existing, plan)
    with steps("download"):
        files = [store.location.reach(download_day_task(day, p)) for day in days]
    try:
        manifest = build_delta_version(
            store, parent.version, days, files, spec=p.encoder_spec(), floors=p.floors(), canaries=p.canaries,
            batch_size=p.batch_size, precision=p.precision, shard_rows=p.shard_rows, progress=False,
            on_progress=EmbedProgress(None, 0, 1, p.progress_seconds).reporter("the delta's passages"),
            progress_every_s=p.progress_seconds, steps=steps, record_unchanged=plan.catch_up)
    except NothingToApply as exc:  # an up-to-date night, not a failure
        return RefreshOutcome(status="up-to-date", version=current, current=current, reason=str(exc), mode="delta",
                              lineage=parent.effective_lineage.model_dump())
    outcome = RefreshOutcome.from_manifest(manifest, reason=plan.reason)
    # A shard a killed run already embedded is skipped and counts 0 in the summary: `encoded` is this run's.
    outcome.counts["encoded_this_run"] = manifest.counts.get("encoded", 0)
    return promote_built(p, steps, store, plan, outcome, f"refresh-index: {p.wiki} delta {plan.reason}")


def promote_built(p: RefreshParams, steps: FlowSteps, store: IndexStore, plan: ModePlan, outcome: RefreshOutcome,
                  why: str) -> RefreshOutcome:
    """Promote a delta that validated (unless promote=false), swapping on the generation the run planned from."""
    if outcome.status == "built" and p.promote:
        with steps("promote"):
            outcome.settle(promote_task(outcome.version, p, reason=why, planned_generation=plan.generation))
        if outcome.status == "promoted":  # nightly and live deltas alike: compact the lineage when it is due
            outcome.compaction = compact_if_due(p, store, store.manifest(outcome.version))
    outcome.current = current_version(store)
    return outcome


def compact_if_due(p: RefreshParams, store: IndexStore, delta: Manifest) -> dict[str, Any] | None:
    """After a delta is promoted: when its lineage is past the compaction budget (`RAGINDEX_COMPACT_SEGMENTS`:
    the segments above its base are merged into one; `RAGINDEX_COMPACT_TOMBSTONE_SHARE`: everything is), compact
    it and promote the compaction on the generation the delta's promote made. A failed compaction leaves the
    delta serving and the run successful; it says why."""
    due = CompactionPolicy(p.compact_segments, p.compact_tombstone_share).due(delta)
    pointer = store.current()
    if due is None or pointer is None or pointer.version != delta.version:
        return None
    logger = get_run_logger()
    logger.info("compacting %s%s: %s", delta.version, " above its base" if due.keep_base else "", due.reason)
    steps = Steps()
    try:
        compacted = compact_version(store, delta.version, keep_base=due.keep_base, floors=p.floors(),
                                    canaries=p.canaries, shard_rows=p.shard_rows, progress=False, steps=steps)
    except RagindexError as exc:
        logger.warning("compaction of %s failed: %s", delta.version, first_line(exc))
        return {"status": "failed", "due": due.reason, "reason": first_line(exc)}
    done = {"status": "rejected", "reason": compacted.validation.reason if compacted.validation else ""}
    if compacted.status == "ready":
        done = promote_task(compacted.version, p,
                            reason=f"refresh-index: compaction of {delta.version} ({due.reason})",
                            planned_generation=pointer.generation)
    return {**done, "due": due.reason, "above_base": due.keep_base, "version": compacted.version,
            "segments_merged": compacted.counts["segments_merged"],
            "tombstones_dropped": compacted.counts["tombstones_dropped"], "timings": steps.timings}


def existing_delta(p: RefreshParams, store: IndexStore, existing: Manifest, plan: ModePlan) -> RefreshOutcome:
    """The same rule as a full build that finds its dump already built (`promote_unfinished`): promote a
    delta still owed its promote; never re-promote one CURRENT was moved away from on purpose (unless the
    operator released the rollback's hold)."""
    holds = f"version {existing.version} already holds this content ({existing.effective_lineage.describe()})"
    lineage = existing.lineage.model_dump() if existing.lineage else None
    if p.promote and owed_promote(store, existing.version):
        done = promote_task(existing.version, p, reason=f"refresh-index: {p.wiki} delta, unfinished promote",
                            planned_generation=plan.generation)
        outcome = RefreshOutcome(status="promoted", version=existing.version, mode="delta", reason=holds,
                                 lineage=lineage, changes=existing.changes)
        outcome.settle(done, f"{holds} and is owed its promote: promoted it")
        outcome.current = current_version(store)
        return outcome
    current = current_version(store)
    if current != existing.version:
        holds += f"; CURRENT is {current}, which replaced it on purpose, so it is not promoted again"
    return RefreshOutcome(status="up-to-date", version=existing.version, current=current, reason=holds,
                          mode="delta", lineage=lineage)
