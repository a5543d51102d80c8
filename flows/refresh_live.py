"""The live path of `refresh-index` (`mode: live`): one micro-delta of the changes EventStreams announced.

A run reads the streams from the serving lineage's stream position (or, the first time after a full build
or a nightly delta, since the lineage's own time) up to now (`tasks.live_changes`), fetches the texts
from the Action API, and applies them through the same delta path as the nightly run
(`tasks.delta_version.apply_revisions`): same cleaning, chunking, reuse, derived index, validation and
promote. The version's lineage records the stream position it applied, so a run killed at any point
replays from the last committed position; replaying is harmless (revision ids decide). A run with nothing
that changes what CURRENT serves writes nothing and says up to date. A lineage older than the streams'
retention falls back, in one line, to the adds-changes days (`run_delta`).

Two live runs never publish over each other: the build lock serializes their builds, and each promote is a
compare-and-swap on the generation its run planned from (the later one ends `conflict`, publishing nothing);
the `refresh-index/live` deployment also runs one at a time (its concurrency limit).
"""

from __future__ import annotations

from prefect import get_run_logger

from flows.params import RefreshParams
from flows.refresh_delta import ModePlan, current_version, existing_delta, held_outcome, promote_built, run_delta
from flows.refresh_tasks import EmbedProgress, FlowSteps, resolve_days_task
from flows.report import RefreshOutcome
from storage.errors import NotFound
from storage.manifest import SourceDump
from storage.store import IndexStore
from tasks.delta_version import NothingToApply, apply_revisions, checked_parent
from tasks.live_changes import BeyondRetention, LiveWindow, read_window


def run_live(p: RefreshParams, steps: FlowSteps, store: IndexStore, plan: ModePlan) -> RefreshOutcome:
    parent = plan.parent
    assert parent is not None  # choose_mode gives live runs the serving version
    lineage = parent.effective_lineage
    try:
        with steps("stream"):
            window = read_window(lineage, p.wiki, streams_url=p.streams_url, api_url=p.action_api_url,
                                 user_agent=p.user_agent, idle_s=p.stream_idle_s)
    except BeyondRetention as exc:
        return _fall_back(p, steps, store, plan, str(exc))
    read = window.read
    summary = (f"{read.seen} event(s) {window.start}: {len(read.events)} of {p.wiki}'s main namespace, "
               f"{len(window.revisions.pages)} page(s) to update, {len(window.revisions.removed)} to remove")
    up_to_date = RefreshOutcome(status="up-to-date", version=parent.version, current=current_version(store),
                                mode="live", lineage=lineage.model_dump(),
                                reason=f"up to date: {summary}; nothing changes what {parent.version} serves")
    if not window.revisions.pages and not window.revisions.removed:
        return up_to_date
    new_lineage = lineage.model_copy(update={"stream": window.position})
    content = new_lineage.content
    held = held_outcome(store, content, f"the live changes to {new_lineage.describe()} (not built again)",
                        mode="live")
    if held is not None:
        return held
    existing = store.ready_with(content)
    if existing is not None:  # a run killed after its commit, before its promote: the same rule as a nightly's
        outcome = existing_delta(p, store, existing, plan)
        outcome.mode = "live"
        return outcome
    spec = p.encoder_spec()
    parent, ancestors = checked_parent(store, parent.version, spec)
    source = SourceDump(wiki=p.wiki, dump_date=_event_date(window), location=p.streams_url)
    try:
        manifest = apply_revisions(
            store, parent, ancestors, window.revisions, source, new_lineage, window=f"the live changes {window.start}",
            spec=spec, floors=p.floors(), canaries=p.canaries, batch_size=p.batch_size, precision=p.precision,
            shard_rows=p.shard_rows, progress=False,
            on_progress=EmbedProgress(None, 0, 1, p.progress_seconds).reporter("the live changes' passages"),
            progress_every_s=p.progress_seconds, steps=steps)
    except NothingToApply:
        return up_to_date
    outcome = RefreshOutcome.from_manifest(manifest, reason=summary)
    outcome.mode = "live"
    return promote_built(p, steps, store, plan, outcome, f"refresh-index: {p.wiki} live, {summary}")


def _event_date(window: LiveWindow) -> str:
    newest = window.position.newest_event if window.position else ""
    return newest[:10].replace("-", "")


def _fall_back(p: RefreshParams, steps: FlowSteps, store: IndexStore, plan: ModePlan, why: str) -> RefreshOutcome:
    get_run_logger().warning(why)
    parent = plan.parent
    assert parent is not None
    lineage = parent.effective_lineage
    try:
        chain = resolve_days_task(p, lineage.watermark)
    except NotFound as exc:
        return RefreshOutcome(status="up-to-date", version=parent.version, current=current_version(store),
                              mode="live", reason=f"{why}; {exc}", lineage=lineage.model_dump())
    days = f"{len(chain.days)} adds-changes day(s) after {lineage.watermark}"
    outcome = run_delta(p, steps, store, ModePlan("delta", f"{why}: {days}", parent=parent, chain=chain,
                                                  generation=plan.generation))
    outcome.reason = f"{why}; {outcome.reason}" if why not in (outcome.reason or "") else outcome.reason
    return outcome
