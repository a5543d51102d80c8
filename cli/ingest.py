"""`ragindex download` and `ragindex passages`: fetch a dump, turn it into passage shards."""

from __future__ import annotations

import time
from typing import Literal

import typer
from rich.console import Console
from rich.table import Table

from cli.options import StoreOption
from flows.settings import load_settings, open_store
from storage.layout import DEFAULT_SHARD_ROWS

app = typer.Typer()


def _summary_table(summary: dict, out: str) -> Table:
    articles = summary["articles"]
    table = Table(title=f"passages -> {out}", show_header=False)
    table.add_row("articles seen", str(articles["seen"]))
    table.add_row("articles kept", str(articles["kept"]))
    for reason, n in articles["skipped"].items():
        table.add_row(f"skipped: {reason}", str(n))
    table.add_row("passages", str(summary["passages"]))
    table.add_row("words", str(summary["words"]))
    table.add_row("shards", str(len(summary["shards"])))
    for step, seconds in summary["timings"].items():
        table.add_row(step, f"{seconds:.2f}")
    return table


@app.command("download")
def download(
    wiki: str = typer.Option(None, "--wiki", help="Dump database name, e.g. enwiki (default: settings)."),
    date: str = typer.Option(None, "--date", help="YYYYMMDD or 'latest' (newest finished run)."),
    mirror: str = typer.Option(None, "--mirror", help="Mirror base URL (default: settings)."),
    store: StoreOption = None,
    job: str = typer.Option("articlesmultistreamdump", "--job",
                            help="Dump job: articlesmultistreamdump or articlesdump."),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per request, with backoff."),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified", help="Download files the mirror gives neither a size nor a sha1 for."
    ),
) -> None:
    """Download a verified Wikipedia dump into the store's downloads/<wiki>/<date>/."""
    from tasks.download import download_dump, resolve_dump

    settings = load_settings()
    started = time.perf_counter()
    ref = resolve_dump(wiki or settings.wiki, date or settings.dump_date, mirror or settings.mirror,
                       settings.user_agent, job=job)
    index_store = open_store(store, settings)
    urls = download_dump(ref, index_store, settings.user_agent, retries=retries,
                         allow_unverified=allow_unverified)
    total = sum(f.size or 0 for f in ref.files)
    print(f"{ref.wiki} {ref.dump_date}: {len(urls)} files, {total / 2**20:.1f} MiB verified "
          f"in {time.perf_counter() - started:.1f}s")
    for url in urls:
        print(f"  {url}")


@app.command("passages")
def passages(
    source: str = typer.Option(..., "--source",
                               help="Dump file, mirror-like dump dir, file:// or s3:// URL of either."),
    out: str = typer.Option(..., "--out", help="Output directory for part-*.parquet + passages.json."),
    workers: int = typer.Option(None, "--workers", min=1, help="Worker processes (default: all cores)."),
    shard_rows: int = typer.Option(DEFAULT_SHARD_ROWS, "--shard-rows", min=1, help="Rows per Parquet shard."),
    job: str = typer.Option("articlesmultistreamdump", "--job",
                            help="Dump job to read from a dumpstatus.json directory."),
    chunker: Literal["dpr", "sections"] | None = typer.Option(
        None, "--chunker", help="dpr (DPR's 100-word windows) or sections (restarted at every section; "
        "default: RAGINDEX_CHUNKER). Embed them with the same --chunker."),
) -> None:
    """Parse, clean and cut a dump into 100-word passage shards."""
    from storage.location import Location
    from tasks.download import resolve_source, verify_in_place
    from tasks.passages import write_passages

    settings = load_settings()
    endpoint = settings.s3_endpoint_url
    ref = resolve_source(source, endpoint, job=job)
    urls = [verify_in_place(f, endpoint, progress=True) for f in ref.files]
    summary = write_passages([Location(u, endpoint) for u in urls], Location(out, endpoint), ref.source(),
                             workers=workers, shard_rows=shard_rows, chunker=chunker or settings.chunker)
    Console().print(_summary_table(summary, out))
