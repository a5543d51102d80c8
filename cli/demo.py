"""`ragindex demo`: the whole system end to end on the enwiki excerpt shipped in the gensim wheel."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer()


@app.command("demo")
def demo(
    workdir: Path = typer.Option(Path("var/demo"), help="Where the demo's store and Prefect database go."),
    keep: bool = typer.Option(False, help="Keep the store of an earlier demo run instead of starting fresh."),
) -> None:
    """Build, query, rebuild after an edit, and roll back: offline, in a few minutes."""
    from cli.refresh import quiet_prefect_console

    quiet_prefect_console()  # its flows' failures end on the command's one line too
    from flows.demo import run_demo

    run_demo(workdir, fresh=not keep)
