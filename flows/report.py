"""What a refresh-index run did: the outcome the flow returns and the report artifact it leaves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from storage.manifest import Manifest, Pointer


@dataclass
class RefreshOutcome:
    """What a run did, returned by the flow and written into its report artifact."""

    # "promoted" / "built" (not promoted: promote=false) / "up-to-date" / "rejected" / "failed", or not
    # promoted on purpose: "held" (a rollback hold is active), "conflict" (CURRENT moved while the run
    # built), "older" (older knowledge than CURRENT's, without allow_older)
    status: str
    version: str | None
    reason: str
    current: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    index: dict[str, Any] | None = None
    dump: dict[str, Any] | None = None
    precision: dict[str, Any] | None = None  # the document encoder's measured precision choice
    mode: str = "full"  # full / delta (what the run built or would have built)
    lineage: dict[str, Any] | None = None  # a delta's base and the adds-changes days applied
    changes: dict[str, Any] | None = None  # pages a delta added, changed, moved, redirected, emptied
    failed_step: str | None = None  # the step a failed run stopped in
    holds: list[str] = field(default_factory=list)  # the rollback holds active when the run ended, one line each
    released_holds: list[str] = field(default_factory=list)  # the holds this run released (resume=true)
    compaction: dict[str, Any] | None = None  # a compaction this run made after its delta (flows.refresh_delta)

    @classmethod
    def from_manifest(cls, m: Manifest, reason: str = "", **fields: Any) -> RefreshOutcome:
        """What a run that built (or found) version `m` did: `built`, or `rejected` with validation's reason."""
        outcome = cls(
            status="built", version=m.version, reason=reason, counts=dict(m.counts), skipped=dict(m.skipped),
            validation=m.validation.model_dump() if m.validation else None, index=m.index.model_dump(),
            dump=m.source.model_dump(), precision=m.precision.model_dump() if m.precision else None,
            mode="delta" if m.is_delta else "full", lineage=m.lineage.model_dump() if m.lineage else None,
            changes=m.changes or None,
        )
        if m.status != "ready":
            outcome.status, outcome.reason = "rejected", m.validation.reason if m.validation else "rejected"
        for name, value in fields.items():
            setattr(outcome, name, value)
        return outcome

    def settle(self, done: dict[str, str], promoted: str | None = None) -> RefreshOutcome:
        """Take in what `promote_task` did: promoted (then `promoted` is the reason, if given), or why not."""
        if done["status"] == "promoted":
            self.status, self.reason = "promoted", promoted or self.reason
        else:
            self.status, self.reason = done["status"], done["reason"]
        return self


def emit_promoted(pointer: Pointer, store_url: str, rollback: bool = False) -> None:
    """The `ragindex.index.promoted` event of a move of CURRENT (promote or rollback), for automations."""
    payload: dict[str, Any] = {"version": pointer.version, "generation": pointer.generation, "store": store_url,
                               "previous": pointer.previous}
    if rollback:
        payload["rollback"] = True
    emit_event("ragindex.index.promoted", resource={"prefect.resource.id": f"ragindex.version.{pointer.version}"},
               payload=payload)


def write_report(o: RefreshOutcome) -> None:
    """The `refresh-index-report` markdown artifact: counts, skipped articles, index, precision, validation, timings."""
    lines = [
        f"# refresh-index: {o.status}",
        "",
        f"- **version**: `{o.version}` ({o.mode})",
        f"- **CURRENT**: `{o.current}`",
        f"- **why**: {o.reason}",
    ]
    if o.failed_step:
        lines.append(f"- **failed in step**: `{o.failed_step}`")
    if o.dump:
        files = ", ".join(f"`{f['name']}`" for f in o.dump.get("files", []))
        lines.append(f"- **dump**: {o.dump.get('wiki')} {o.dump.get('dump_date')} ({files})")
    if o.lineage:
        days = ", ".join(f"{d['date']} (maxrevid {d['maxrevid']})" for d in o.lineage.get("days", []))
        lines.append(f"- **lineage**: base `{o.lineage.get('base_version')}` (dump {o.lineage.get('base_dump')}); "
                     f"days applied: {days or 'none'}")
    if o.compaction:
        c = o.compaction
        shape = " above the base" if c.get("above_base") else ""
        lines.append(f"- **compaction**{shape}: {c['status']} `{c.get('version')}` ({c['due']}; "
                     f"{c.get('segments_merged', 0)} segments merged, {c.get('tombstones_dropped', 0)} tombstoned "
                     f"rows dropped){': ' + c['reason'] if c.get('reason') else ''}")
    if o.released_holds:
        lines += ["", "## Rollback holds released by this run (resume=true)", ""]
        lines += [f"- {h}" for h in o.released_holds]
    if o.holds:
        lines += ["", "## Rollback holds", "", "Automatic refreshes promote nothing until `ragindex resume` "
                  "(or `-p resume=true`) releases them.", ""]
        lines += [f"- {h}" for h in o.holds]
    if o.changes:
        lines += ["", "## Pages changed", "", "| change | pages | examples |", "|---|---:|---|"]
        for kind in ("added", "changed", "moved", "redirected", "emptied"):
            pages = o.changes.get(kind, [])
            examples = ", ".join(str(title) for _, title in pages[:5])
            lines.append(f"| {kind} | {len(pages):,} | {examples} |")
        lines.append(f"| stale (not newer than the parent) | {o.changes.get('stale', 0):,} | |")
        lines.append(f"| other namespaces (ignored) | {o.changes.get('ignored_namespace', 0):,} | |")
    if o.counts:
        lines += ["", "## Counts", "", "| what | n |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in sorted(o.counts.items())]
    if o.skipped:
        lines += ["", "## Articles skipped", "", "| reason | n |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in sorted(o.skipped.items())]
    if o.index:
        lines += ["", "## Index", "", f"- spec `{o.index.get('spec')}`, factory `{o.index.get('factory')}`,"
                  f" {o.index.get('bytes', 0):,} bytes, search params `{o.index.get('search_params')}`"]
    if o.precision:
        speeds = ", ".join(f"{k} {v:.1f}/s" for k, v in o.precision["passages_per_s"].items())
        lines += ["", f"- **precision**: {o.precision['chosen']} (asked {o.precision['requested']}; cosine to "
                  f"fp32 {o.precision['cosine']:.5f}; probe {speeds})"]
    if o.validation:
        lines += ["", f"## Validation: {'passed' if o.validation.get('passed') else 'FAILED'}", ""]
        if o.validation.get("reason"):
            lines.append(f"- reason: {o.validation['reason']}")
        lines += [f"- {k}: `{v}`" for k, v in sorted(o.validation.get("checks", {}).items())]
    if o.timings:
        lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in o.timings.items()]
    create_markdown_artifact("\n".join(lines), key="refresh-index-report", description=f"refresh-index {o.status}")
    print(f"refresh-index: {o.status} {o.version or ''} {o.reason}".strip())
