"""The `ragindex` command line: one typer app made of one module-level app per part it drives.

Every failure a user can cause ends as one line on stderr and a non-zero exit, never a traceback
(set RAGINDEX_DEBUG=1 to see one).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import click
import typer
from pydantic import ValidationError
from typer.exceptions import TyperException

from cli import demo, embed, ingest, refresh, serve, store, takedown
from cli.options import debug_requested
from storage.errors import RagindexError, first_line

app = typer.Typer(
    name="ragindex",
    help="Keep a RAG model's Wikipedia index fresh: download, passages, embed, build, promote, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for _part in (ingest, embed, store, takedown, refresh, serve, demo):
    app.add_typer(_part.app)  # no name: the part's commands join the top level


def _print_version(requested: bool) -> None:
    if requested:
        try:
            print(f"ragindex {package_version('ragindex')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("ragindex (not installed: no package metadata)")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the installed version and exit."
    ),
) -> None:
    pass  # the app's options only; its help is the Typer's


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, prog_name="ragindex", standalone_mode=False)
    except (click.exceptions.Abort, typer.Abort):
        fail("aborted", 130)
    except (click.ClickException, TyperException) as exc:
        # typer >= 0.29 raises from its own vendored click, whose exceptions are TyperExceptions.
        if hasattr(exc, "show"):
            exc.show()
        else:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except (RagindexError, ValidationError, OSError, ValueError) as exc:
        if debug_requested():
            raise
        fail(_one_line(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # an unexpected failure is still one line, with a way to see more
        if debug_requested():
            raise
        fail(f"unexpected {type(exc).__name__}: {_one_line(exc)} (set RAGINDEX_DEBUG=1 for a traceback)")
    if isinstance(rv, int) and rv:
        raise SystemExit(rv)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "input"
        return f"invalid {where}: {err.get('msg')}"
    return first_line(exc)


if __name__ == "__main__":
    main()
