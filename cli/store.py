"""`ragindex` commands for the version store: build, versions, promote, rollback, gc, pin, unpin, keygen."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import typer

from cli.options import StoreOption
from cli.versions_table import print_versions
from flows.settings import load_settings, open_store, parse_size
from storage import retention
from storage.catalog import read_catalog
from storage.errors import Rejected
from storage.holds import Hold
from storage.location import Location
from storage.store import IndexStore, Move
from tasks.validation_floors import DEFAULT_MIN_RECALL

app = typer.Typer()


def versions_report(store: IndexStore) -> dict[str, Any]:
    """What `ragindex versions --json` prints: CURRENT, pins, every visible version and the active rollback
    holds (storage.catalog)."""
    return read_catalog(store).to_json()


def _warn_history(pointer: Move) -> None:
    if not pointer.history_written:
        print(f"warning: CURRENT did move to {pointer.version}, but its history entry could not be written; "
              "the next promote or rollback writes it", file=sys.stderr)


@app.command("build")
def build(
    passages: str = typer.Option(..., "--passages", help="Passage shard directory (local, file:// or s3://)."),
    embeddings: str = typer.Option(..., "--embeddings", help="Embedding shard directory."),
    index_spec: str | None = typer.Option(
        None, "--index-spec",
        help="auto | flat | hnsw[:M=32] | ivfpq[:nlist=..,m=..,opq=1] | ivfsq[:bits=8] | a faiss factory string.",
    ),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help="e.g. 16GiB (default from settings)."),
    store_url: StoreOption = None,
    canaries: str | None = typer.Option(None, "--canaries", help="JSONL of {question, title} canaries."),
    question_encoder: str | None = typer.Option(
        None, "--question-encoder", help="Question encoder for canaries (default: the embeddings' pair)."
    ),
    allow_count_change: bool = typer.Option(
        False, "--allow-count-change", help="Accept a passage count beyond ±20% of the previous ready version."
    ),
    min_recall: float = typer.Option(
        DEFAULT_MIN_RECALL, "--min-recall", help="recall@10 floor of the validation gate."
    ),
    target_recall: float = typer.Option(0.95, "--target-recall", help="Recall nprobe/efSearch are tuned for."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Build, validate and commit a new version from passage and embedding shards (never promotes)."""
    from tasks.assemble_version import build_version
    from tasks.validate import ValidationFloors

    settings = load_settings()
    store = open_store(store_url, settings)
    if not 0 < min_recall <= 1:
        raise Rejected(f"--min-recall must be in (0, 1], got {min_recall}")
    floors = ValidationFloors(allow_count_change=allow_count_change, recall_at_10=min_recall)
    manifest = build_version(
        store, Location(passages, settings.s3_endpoint_url), Location(embeddings, settings.s3_endpoint_url),
        spec=index_spec or settings.index_spec,
        memory_budget=parse_size(memory_budget or settings.memory_budget), floors=floors, canaries=canaries,
        question_encoder=question_encoder or settings.question_encoder, progress=not as_json,
        target_recall=target_recall,
    )
    if as_json:
        print(manifest.to_json())
    if manifest.status != "ready":
        reason = manifest.validation.reason if manifest.validation else "validation failed"
        raise Rejected(f"version {manifest.version} was rejected: {reason}")
    if not as_json:
        print(f"built {manifest.version}: ready, {manifest.counts.get('passages')} passages, "
              f"index {manifest.index.factory} {manifest.index.search_params or ''}".rstrip())
        print(f"promote it with: ragindex promote {manifest.version}")


@app.command("versions")
def versions(
    store_url: StoreOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """List versions, newest first, with CURRENT / previous / pinned marks, lineage, own and shared size."""
    store = open_store(store_url, must_exist=True)
    if as_json:
        print(json.dumps(versions_report(store), indent=2))
        return
    catalog = read_catalog(store)
    print_versions(catalog)
    _print_holds(list(catalog.holds))


@app.command("promote")
def promote(
    version: str = typer.Argument(..., help="Version id to make CURRENT (must be ready)."),
    store_url: StoreOption = None,
    reason: str | None = typer.Option(None, "--reason", help="Why, for the history."),
    expected_generation: int | None = typer.Option(
        None, "--expected-generation", help="Fail unless CURRENT is still at this generation."
    ),
) -> None:
    """Point CURRENT at a validated version (compare-and-swap)."""
    from tasks.promote import promote_version

    store = open_store(store_url, must_exist=True)
    pointer = promote_version(store, version, reason=reason, expected_generation=expected_generation)
    if not pointer.moved:
        print(f"{pointer.version} is already CURRENT (generation {pointer.generation}, "
              f"previous {pointer.previous}): nothing changed")
        return
    print(f"CURRENT -> {pointer.version} (generation {pointer.generation}, previous {pointer.previous})")
    _warn_history(pointer)
    _print_holds(store.holds(), file=sys.stderr)


@app.command("rollback")
def rollback(
    version: str | None = typer.Argument(
        None, help="Version to go back to (default: the newest ready one older than CURRENT)."
    ),
    store_url: StoreOption = None,
    reason: str | None = typer.Option(None, "--reason", help="Why, for the history."),
) -> None:
    """Point CURRENT back at an earlier ready version."""
    from tasks.promote import rollback_version

    pointer = rollback_version(open_store(store_url, must_exist=True), version, reason=reason)
    print(f"CURRENT -> {pointer.version} (generation {pointer.generation}, rolled back from {pointer.previous})")
    _warn_history(pointer)
    if pointer.hold:
        print(f"{pointer.hold.describe()}: automatic refreshes promote nothing until `ragindex resume`")


@app.command("resume")
def resume(
    store_url: StoreOption = None,
    reason: str | None = typer.Option(None, "--reason", help="Why, kept in each released hold."),
) -> None:
    """Release every rollback hold: automatic refreshes may promote again, the content rolled back from included."""
    released = open_store(store_url).release_holds(reason=reason)
    for hold in released:
        print(f"released {hold.describe()}")
    if not released:
        print("no rollback hold is active: nothing to release")


def _print_holds(holds: list[Hold], file: Any = None) -> None:
    """The active holds, and what they mean (a manual promote is an operator's act: it leaves them as they are)."""
    for hold in holds:
        print(f"held: {hold.describe()}", file=file)
    if holds:
        print("automatic refreshes promote nothing until `ragindex resume`", file=file)


@app.command("gc")
def gc(
    keep: int = typer.Option(..., "--keep", help="Keep the newest N versions (plus CURRENT, previous, pinned)."),
    store_url: StoreOption = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
    stale_hours: float = typer.Option(6.0, "--stale-hours", help="Staging idle this long counts as abandoned."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Delete old versions (never one a kept delta shares rows with), abandoned staging and unused downloads."""
    if stale_hours < 0:
        raise Rejected(f"--stale-hours must be >= 0, got {stale_hours}")
    store = open_store(store_url, must_exist=True)
    report = retention.gc(store, keep, stale_after=timedelta(hours=stale_hours), dry_run=dry_run)
    data = {"dry_run": dry_run, **report.__dict__}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for key, label in (("deleted_versions", "version"), ("deleted_corrupt", "corrupt version"),
                       ("deleted_staging", "staging"), ("deleted_downloads", "download"),
                       ("deleted_results", "task result")):
        for item in data[key]:
            print(f"{verb} {label} {item}")
    for item in report.kept_as_segment:
        print(f"kept version {item}: a segment of a kept delta version (it serves its rows)")
    for item in report.kept_in_doubt:
        print(f"kept version {item}: a kept version's manifest is unreadable, so it may be one of its segments")
    if report.kept_for_build:
        print(f"kept every staging area and download: a build holds the lock ({report.kept_for_build})")
    for item in report.skipped_links:
        print(f"left {item} alone: a symbolic link (gc never deletes through one)")
    extra = [f"{len(report.kept_as_segment)} only as segment(s)" if report.kept_as_segment else "",
             f"{len(report.kept_in_doubt)} in doubt" if report.kept_in_doubt else ""]
    extra_text = ", ".join(e for e in extra if e)
    print(f"kept {len(report.kept)} version(s)" + (f" ({extra_text})" if extra_text else ""), file=sys.stdout)


@app.command("pin")
def pin(
    version: str = typer.Argument(..., help="Version to protect from gc."),
    store_url: StoreOption = None,
) -> None:
    """Protect a version from gc."""
    open_store(store_url, must_exist=True).pin(version)
    print(f"pinned {version}")


@app.command("unpin")
def unpin(
    version: str = typer.Argument(..., help="Version to release."),
    store_url: StoreOption = None,
) -> None:
    """Let gc delete a version again."""
    open_store(store_url, must_exist=True).unpin(version)
    print(f"unpinned {version}")


@app.command("compact")
def compact(
    version: str | None = typer.Argument(None, help="Delta version to compact (default: CURRENT)."),
    store_url: StoreOption = None,
    no_promote: bool = typer.Option(False, "--no-promote", help="Build and validate it, but leave CURRENT."),
    keep_base: bool = typer.Option(False, "--keep-base", help="Merge only the segments above the lineage's base "
                                   "into one on it (costs the live data, not the corpus); the base's tombstones stay."),
) -> None:
    """Merge a delta's segments into one version (no encoding, no retraining); promote it when it compacts
    CURRENT (compare-and-swap on the generation read, refused while a rollback hold is active)."""
    from tasks.compact_version import compact_version
    from tasks.promote import promote_planned

    store = open_store(store_url, must_exist=True)
    pointer = store.current()
    target = version or (pointer.version if pointer else None)
    if target is None:
        raise Rejected("nothing is CURRENT: name the version to compact")
    manifest = compact_version(store, target, keep_base=keep_base)
    if manifest.status != "ready":
        reason = manifest.validation.reason if manifest.validation else "validation failed"
        raise Rejected(f"compaction {manifest.version} of {target} was rejected: {reason}")
    print(f"compacted {target} ({manifest.counts['segments_merged']} segments{' above its base' if keep_base else ''}, "
          f"{manifest.counts['tombstones_dropped']} tombstoned rows dropped) into {manifest.version}: "
          f"{manifest.counts['passages']} passages of its own, nothing encoded")
    if no_promote or pointer is None or pointer.version != target:
        print(f"promote it with: ragindex promote {manifest.version}")
        return
    move = promote_planned(store, manifest.version, planned_generation=pointer.generation, actor="ragindex compact",
                           reason=f"compaction of {target}")
    print(f"CURRENT -> {move.version} (generation {move.generation}, previous {move.previous})")


@app.command("keygen")
def keygen(
    out: str = typer.Option(..., "--out", help="Directory to write the key pair into (created 0700)."),
) -> None:
    """Make an Ed25519 key pair for signing manifests: the private key (0600) for build workers'
    RAGINDEX_SIGNING_KEY, the public key for the RAGINDEX_TRUSTED_KEYS of servers and operators."""
    from storage.signing import generate_key_pair

    kid, private_path, public_path = generate_key_pair(out)
    print(f"key {kid}: private {private_path} (RAGINDEX_SIGNING_KEY on build workers), "
          f"public {public_path} (RAGINDEX_TRUSTED_KEYS on servers and operators)")


@app.command("diff")
def diff(
    a: str = typer.Argument(..., help="The older version."),
    b: str = typer.Argument(..., help="The newer version."),
    store_url: StoreOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document, every page included."),
) -> None:
    """Pages added, changed (moved) and removed from version A to version B, with passages and bytes."""
    from rag_model.version_diff import diff_versions

    result = diff_versions(open_store(store_url, must_exist=True), a, b)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    print(f"{a} -> {b}")
    print(f"pages: {len(result.added)} added, {len(result.changed)} changed ({len(result.moved)} moved), "
          f"{len(result.removed)} removed")
    print(f"passages: {result.passages_a} -> {result.passages_b} ({result.rows_only_a} only in {a}, "
          f"{result.rows_only_b} only in {b})")
    print(f"bytes served: {result.bytes_a} -> {result.bytes_b}; stored by {b} on top of {a}: {result.bytes_only_b}")
    for kind, changes in (("added", result.added), ("changed", result.changed), ("removed", result.removed)):
        for c in changes:
            title = f"{c.old_title} → {c.title}" if c.old_title is not None else c.title
            print(f"  {kind:<8} {c.page_id:>10}  {title}  (rev {c.old_rev} → {c.new_rev})  {c.url}")
