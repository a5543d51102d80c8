"""`ragindex refresh`: the whole refresh-index flow, run in this process.

The flow runs against PREFECT_API_URL, or else a temporary Prefect server that Prefect starts for
this process. Either way its logs go to the API (the run page) in full; the terminal gets only the
runs' progress, and a failure ends as the command's one error line (see `quiet_prefect_console`).
"""

from __future__ import annotations

import json
import logging
import os

import typer

from cli.options import StoreOption, debug_requested
from storage.layout import DEFAULT_SHARD_ROWS

app = typer.Typer()

# How Prefect words a run that ended well; any other "Finished in state ..." is a failure.
_FINISHED = "Finished in state "
_FINISHED_WELL = (_FINISHED + "Completed", _FINISHED + "Cached")


class RunFailuresOffConsole(logging.Filter):
    """On Prefect's console handler: pass the runs' progress, drop what a failure adds.

    Dropped: any record carrying a traceback, a flow or task run's ERROR lines and its
    "Finished in state Failed/Crashed" line, and the temporary server's start and stop notices
    (INFO on the bare `prefect` logger; the stop comes at exit, after the command's error line).
    Prefect's API handler sits on the run loggers themselves and never sees this filter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            message = record.getMessage()
            failed_finish = message.startswith(_FINISHED) and not message.startswith(_FINISHED_WELL)
            return record.levelno < logging.ERROR and not failed_finish
        return record.name != "prefect" or record.levelno >= logging.WARNING


def quiet_prefect_console() -> None:
    """Make the runs of this process end on the command's one line, not on Prefect's tracebacks.

    Call before the first flow runs. Adds `RunFailuresOffConsole` to Prefect's console handler
    (configuring Prefect's logging first if importing prefect has not yet) and turns off the
    temporary server's telemetry, whose failures offline the server child prints on this
    process's stderr. With RAGINDEX_DEBUG set, everything shows.
    """
    if debug_requested():
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the server child's environment
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, RunFailuresOffConsole) for f in handler.filters
        ):
            handler.addFilter(RunFailuresOffConsole())


@app.command("refresh")
def refresh(
    source: str = typer.Option(None, help="Dump file or mirror-like directory (path, file://, s3://)."),
    wiki: str = typer.Option(
        None, help="Dump database, e.g. enwiki (with --date, from the mirror; with --source, names its wiki)."
    ),
    date: str = typer.Option(
        None, help="YYYYMMDD or latest (default: decide each night, see --full); with --source, the date of a "
        "dump whose file name has none (default: its newest revision's)."
    ),
    mirror: str = typer.Option(None, help="Mirror base URL (default: settings)."),
    full: bool = typer.Option(False, "--full", help="Build from the newest full dump, whatever the days hold."),
    incremental: bool = typer.Option(
        False, "--incremental", help="Apply the finished adds-changes days to CURRENT as one delta version."
    ),
    live: bool = typer.Option(
        False, "--live", help="Apply the EventStreams changes since CURRENT's stream position as one delta version."
    ),
    streams: str = typer.Option(None, "--streams", help="EventStreams base URL (default: RAGINDEX_STREAMS_URL)."),
    api: str = typer.Option(None, "--api", help="The wiki's Action API URL (default: RAGINDEX_API_URL, else the "
                            "wiki's own api.php)."),
    store: StoreOption = None,
    encoder: str = typer.Option(None, help="Document encoder: HF id or local directory."),
    encoder_kind: str = typer.Option(None, help="dpr or mean."),
    chunker: str = typer.Option(None, help="dpr (DPR's 100-word windows) or sections (restarted at every section; "
                                "default: RAGINDEX_CHUNKER)."),
    normalize: bool | None = typer.Option(
        None, "--normalize/--no-normalize", help="L2-normalise vectors (default: the model's own config)."
    ),
    question_encoder: str = typer.Option(None, help="Question encoder paired with the document encoder."),
    index_spec: str = typer.Option(None, help="auto, flat, hnsw, ivfpq, ivfsq or a faiss factory string."),
    memory_budget: str = typer.Option(None, help="Memory budget for the index, e.g. 16GiB."),
    shard_rows: int = typer.Option(DEFAULT_SHARD_ROWS, help="Passages per shard."),
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
    from flows.settings import load_settings

    if source and date == "latest":
        raise typer.BadParameter("with --source, --date names the dump's date (YYYYMMDD), not 'latest'")
    if sum((full, incremental, live)) > 1:
        raise typer.BadParameter("give one of --full, --incremental and --live")
    load_settings()  # a bad RAGINDEX_* value fails here, before a Prefect server starts
    quiet_prefect_console()
    from flows.refresh import refresh_index

    outcome = refresh_index(
        wiki=wiki, dump_date=date, source=source, store_url=store, encoder=encoder,
        encoder_kind=encoder_kind, chunker=chunker, normalize=normalize, question_encoder=question_encoder,
        index_spec=index_spec, memory_budget=memory_budget, shard_rows=shard_rows, canaries=canaries,
        allow_count_change=allow_count_change, force=force, allow_unverified=allow_unverified,
        promote=not no_promote, allow_older=allow_older, resume=resume, precision=precision, compile=compile_,
        task_runner=task_runner, ray_address=ray_address, mirror=mirror,
        mode="full" if full else "incremental" if incremental else "live" if live else "auto",
        streams_url=streams, api_url=api,
    )
    shown = ("status", "mode", "version", "current", "reason", "counts")
    typer.echo(json.dumps({k: outcome[k] for k in shown}, indent=2))
