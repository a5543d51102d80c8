"""What a nightly refresh does, decided each night by itself, and the delta path of `refresh-index`.

The serving lineage is CURRENT's: its base full dump and the adds-changes days applied since
(`Manifest.lineage`). Each run, in auto mode: a finished full dump newer than that base means a
full build (which reuses the embeddings of unchanged passages); otherwise every finished
adds-changes day after the lineage's watermark, up to the first unfinished one, becomes one delta
version on top of CURRENT (`tasks.delta_version`); otherwise the run is up to date. `full` and
`incremental` force a mode. A named dump (`source`, or a date other than `latest`) is always a full build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flows.params import RefreshParams
from flows.refresh_tasks import FlowSteps, download_day_task, promote_task, resolve_days_task
from flows.report import RefreshOutcome
from storage.errors import NotFound, Rejected
from storage.manifest import Manifest
from storage.store import IndexStore
from tasks import download
from tasks.delta_version import NothingToApply, build_delta_version
from tasks.incr_dumps import IncrChain
from tasks.promote import promote_unfinished


@dataclass
class ModePlan:
    mode: Literal["full", "delta", "up-to-date"]
    reason: str
    parent: Manifest | None = None
    chain: IncrChain | None = None


def choose_mode(p: RefreshParams, store: IndexStore) -> ModePlan:
    named = bool(p.source) or p.dump_date != "latest"
    if named or p.mode == "full":
        if p.mode == "incremental":
            raise Rejected("--incremental applies a mirror's adds-changes days to CURRENT: "
                           "it cannot be combined with --source or --date")
        return ModePlan("full", "a dump was named" if named else "a full build was asked for")
    pointer = store.current()
    parent = store.manifest(pointer.version) if pointer else None
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
                                    f"{lineage.base_dump}")
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
    if p.mode == "auto" and not parent.is_delta:
        return ModePlan("full", f"no finished adds-changes day after {lineage.watermark}{stop}")
    return ModePlan("up-to-date", f"no finished adds-changes day after {lineage.watermark}{stop}", parent=parent)


def existing_delta(store: IndexStore, parent: Manifest, dates: list[str]) -> Manifest | None:
    """A ready version that already applies exactly these days to `parent` (a rerun, or a rolled-back night)."""
    want = [d.date for d in parent.effective_lineage.days] + dates
    for m in store.list_versions():
        if m.status == "ready" and m.parent == parent.version and m.lineage \
                and [d.date for d in m.lineage.days] == want:
            return m
    return None


def run_delta(p: RefreshParams, steps: FlowSteps, store: IndexStore, plan: ModePlan) -> RefreshOutcome:
    """Download the plan's days, build, validate and (unless promote=false) promote one delta version."""
    parent = plan.parent
    current = parent.version if parent else None
    if plan.mode == "up-to-date" or plan.chain is None or parent is None:
        return RefreshOutcome(status="up-to-date", version=current, current=current, reason=plan.reason,
                              mode="delta", lineage=parent.effective_lineage.model_dump() if parent else None)
    days = plan.chain.days
    existing = existing_delta(store, parent, [d.date for d in days])
    if existing is not None:
        return _existing_delta(p, store, existing, plan)
    with steps("download"):
        files = [store.location.reach(download_day_task(day, p)) for day in days]
    try:
        manifest = build_delta_version(
            store, parent.version, days, files, spec=p.encoder_spec(), floors=p.floors(), canaries=p.canaries,
            batch_size=p.batch_size, precision=p.precision, shard_rows=p.shard_rows, progress=False, steps=steps)
    except NothingToApply as exc:  # an up-to-date night, not a failure
        return RefreshOutcome(status="up-to-date", version=current, current=current, reason=str(exc), mode="delta",
                              lineage=parent.effective_lineage.model_dump())
    outcome = RefreshOutcome.from_manifest(manifest, reason=plan.reason)
    if outcome.status == "built" and p.promote:
        with steps("promote"):
            promote_task(manifest.version, p, reason=f"refresh-index: {p.wiki} delta {plan.reason}")
        outcome.status = "promoted"
    pointer = store.current()
    outcome.current = pointer.version if pointer else None
    return outcome


def _existing_delta(p: RefreshParams, store: IndexStore, existing: Manifest, plan: ModePlan) -> RefreshOutcome:
    """The same rule as a full build that finds its dump already built (`promote_unfinished`): promote a
    delta still owed its promote; never re-promote one CURRENT was moved away from on purpose."""
    holds = f"version {existing.version} already applies these days to {existing.parent}"
    lineage = existing.lineage.model_dump() if existing.lineage else None
    if p.promote and promote_unfinished(store.current(), store.history(), existing.version):
        promote_task(existing.version, p, reason=f"refresh-index: {p.wiki} delta, unfinished promote")
        return RefreshOutcome(status="promoted", version=existing.version, current=existing.version, mode="delta",
                              reason=f"{holds} and was never promoted: promoted it", lineage=lineage,
                              changes=existing.changes)
    pointer = store.current()
    current = pointer.version if pointer else None
    if current != existing.version:
        holds += f"; CURRENT is {current}, which replaced it on purpose, so it is not promoted again"
    return RefreshOutcome(status="up-to-date", version=existing.version, current=current, reason=holds,
                          mode="delta", lineage=lineage)
