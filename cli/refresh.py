"""`ragindex refresh`: the whole refresh-index flow, run in this process."""

from __future__ import annotations

import json

import typer

from cli.options import StoreOption

app = typer.Typer()


@app.command("refresh")
def refresh(
    source: str = typer.Option(None, help="Dump file or mirror-like directory (path, file://, s3://)."),
    wiki: str = typer.Option(
        None, help="Dump database, e.g. enwiki (with --date, from the mirror; with --source, names its wiki)."
    ),
    date: str = typer.Option(None, help="YYYYMMDD or latest (default: decide each night, see --full)."),
    mirror: str = typer.Option(None, help="Mirror base URL (default: settings)."),
    full: bool = typer.Option(False, "--full", help="Build from the newest full dump, whatever the days hold."),
    incremental: bool = typer.Option(
        False, "--incremental", help="Apply the finished adds-changes days to CURRENT as one delta version."
    ),
    store: StoreOption = None,
    encoder: str = typer.Option(None, help="Document encoder: HF id or local directory."),
    encoder_kind: str = typer.Option(None, help="dpr or mean."),
    normalize: bool | None = typer.Option(
        None, "--normalize/--no-normalize", help="L2-normalise vectors (default: the model's own config)."
    ),
    question_encoder: str = typer.Option(None, help="Question encoder paired with the document encoder."),
    index_spec: str = typer.Option(None, help="auto, flat, hnsw, ivfpq, ivfsq or a faiss factory string."),
    memory_budget: str = typer.Option(None, help="Memory budget for the index, e.g. 16GiB."),
    shard_rows: int = typer.Option(100_000, help="Passages per shard."),
    canaries: str = typer.Option(None, help="JSONL of {question, title} that must be found."),
    allow_count_change: bool = typer.Option(False, help="Accept a passage count outside +-20% of the last."),
    force: bool = typer.Option(False, help="Build even if a version of this dump already exists."),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified", help="Download mirror files that have neither a size nor a sha1."
    ),
    no_promote: bool = typer.Option(False, "--no-promote", help="Build and validate, but leave CURRENT."),
    allow_older: bool = typer.Option(
        False, "--allow-older", help="Promote even a version whose knowledge (dump, or newest applied day) is older "
        "than CURRENT's; without it such a version is built and kept, not promoted."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Release every rollback hold first (as `ragindex resume` does): this run may promote."
    ),
    precision: str = typer.Option(
        "auto", help="auto (the fastest measured within tolerance of fp32), fp32, bf16, fp16 or int8."
    ),
    compile_: bool = typer.Option(
        False, "--compile", help="torch.compile the encoder of a full build first (a one-time cost big builds "
        "earn back; deltas never compile)."
    ),
    task_runner: str = typer.Option("threads", help="threads or ray."),
    ray_address: str = typer.Option(None, help="Ray cluster address (auto, ray://host:10001)."),
) -> None:
    """Download, parse, embed, build, validate and promote a new index version."""
    from flows.refresh import refresh_index

    if source and date:
        raise typer.BadParameter("give either --source or --date, not both (with --source, --wiki names its wiki)")
    if full and incremental:
        raise typer.BadParameter("give either --full or --incremental, not both")
    outcome = refresh_index(
        wiki=wiki, dump_date=date, source=source, store_url=store, encoder=encoder,
        encoder_kind=encoder_kind, normalize=normalize, question_encoder=question_encoder,
        index_spec=index_spec, memory_budget=memory_budget, shard_rows=shard_rows, canaries=canaries,
        allow_count_change=allow_count_change, force=force, allow_unverified=allow_unverified,
        promote=not no_promote, allow_older=allow_older, resume=resume, precision=precision, compile=compile_,
        task_runner=task_runner, ray_address=ray_address, mirror=mirror,
        mode="full" if full else "incremental" if incremental else "auto",
    )
    shown = ("status", "mode", "version", "current", "reason", "counts")
    typer.echo(json.dumps({k: outcome[k] for k in shown}, indent=2))
