"""`ragindex` commands: query (answer from the store, no server) and serve (the HTTP server)."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import typer
from rich.markup import escape

from cli.options import StoreOption
from storage.errors import RagindexError, first_line

app = typer.Typer()

LOG_LEVELS = ("debug", "info", "warning", "error")
_BARE = re.compile(r'[^\s"=\\]+')  # a logfmt value that needs no quotes


class LogfmtFormatter(logging.Formatter):
    """One `key=value` line per record: `ts`, `level`, `logger`, then the record's `event` and its
    `fields` (what the serving code passes as `extra`) or, for any other record, its `msg`.

    An exception is its type and first line (`error=`); its traceback is kept for `--log-level debug`.
    """

    def __init__(self, tracebacks: bool = False) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        pairs: dict[str, Any] = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname.lower(),
                                 "logger": record.name}
        event = getattr(record, "event", None)
        if event:
            pairs["event"] = event
            pairs.update(getattr(record, "fields", None) or {})
        else:
            pairs["msg"] = record.getMessage()
        line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in pairs.items())
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f" error={_logfmt_value(f'{type(exc).__name__}: {first_line(exc)}')}"
            if self.tracebacks:
                line += "\n" + "".join(traceback.format_exception(exc)).rstrip()
        return line


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def configure_server_logging(level: str) -> None:
    """stderr gets one logfmt line per record: ragindex's own loggers (`ragindex.serving` events,
    `ragindex.access`) and rag_model's at `level`, every other library's at warning or above."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    root = logging.getLogger()
    if not any(isinstance(h.formatter, LogfmtFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter(tracebacks=numeric <= logging.DEBUG))
        root.addHandler(handler)
    root.setLevel(max(logging.WARNING, numeric))
    for name in ("ragindex", "rag_model"):
        logging.getLogger(name).setLevel(numeric)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to serve on, or one line saying why it cannot be.

    Bound before anything expensive loads, and handed to uvicorn, so a busy port is found at once
    and nothing else can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "busy"
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RagindexError(f"cannot listen on {host}:{port}: {exc.strerror or first_line(exc)}") from None
    return sock


@app.command("query")
def query(
    text: str = typer.Argument(..., help="The question."),
    k: int = typer.Option(5, "--k", min=1, max=100, help="How many passages (1-100)."),
    version: str | None = typer.Option(None, "--version", help="Version to ask (default: CURRENT)."),
    store: StoreOption = None,
    question_encoder: str | None = typer.Option(
        None, "--question-encoder", help="ID|PATH (default: the one the version pairs with its encoder)."
    ),
    question_encoder_kind: str | None = typer.Option(
        None, "--question-encoder-kind", help="dpr|mean (default: the version's encoder kind)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document, nothing else."),
    compare: tuple[str, str] | None = typer.Option(
        None, "--compare", metavar="V1 V2", help="Answer from two versions side by side, marking what entered "
        "and what left the top k."),
) -> None:
    """Retrieve passages for TEXT straight from the store, without a server."""
    from flows.settings import load_settings, open_store
    from rag_model.query import query_store

    settings = load_settings()
    st = open_store(store, settings, must_exist=True)

    def ask(name: str | None):
        return query_store(st, text, k, name, question_encoder or settings.question_encoder, question_encoder_kind,
                           cache_dir=settings.cache_base, cache_max_bytes=settings.cache_max_bytes)

    if compare:
        if version is not None:
            raise RagindexError("--compare names both versions: drop --version")
        _print_comparison(text, k, ask(compare[0]), ask(compare[1]), as_json)
        return
    answer = ask(version)
    hits = answer.hits
    if as_json:
        print(json.dumps(answer.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{text!r} — version {answer.version}")
    for column in ("#", "score", "title", "passage", "text", "url"):
        table.add_column(column, overflow="fold")
    for rank, h in enumerate(hits, 1):
        snippet = h.text if len(h.text) <= 160 else h.text[:157] + "..."
        table.add_row(str(rank), f"{h.score:.3f}", h.title, h.passage_id, snippet, h.url)
    Console().print(table)


def _print_comparison(text: str, k: int, a: Any, b: Any, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from rag_model.compare import Comparison

    comparison = Comparison(text, a.version, b.version, a.hits, b.hits)
    if as_json:
        print(json.dumps(comparison.to_json()))
        return
    table = Table(title=f"{text!r}: {a.version} vs {b.version} ({len(comparison.entered)} entered, "
                        f"{len(comparison.left)} left the top {k})")
    for column in ("#", a.version, b.version):
        table.add_column(column, overflow="fold")

    def cell(hit: dict | None) -> str:
        if hit is None:
            return ""
        mark = {"left": "[red]LEFT[/red] ", "entered": "[green]ENTERED[/green] "}.get(hit["mark"] or "", "")
        return f"{mark}{escape(hit['title'])} ({hit['score']:.3f}, rev {hit['rev_id']})\n{hit['url']}"

    for rank, (ra, rb) in enumerate(comparison.rows(), 1):
        table.add_row(str(rank), cell(ra), cell(rb))
    Console().print(table)


@app.command("serve")
def serve(
    store: StoreOption = None,
    host: str | None = typer.Option(None, "--host", help="Interface (default: RAGINDEX_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default: RAGINDEX_PORT)."),
    poll_seconds: float | None = typer.Option(
        None, "--poll-seconds", help="How often to check CURRENT and the deny-list, in seconds (default: 5)."
    ),
    question_encoder: str | None = typer.Option(
        None, "--question-encoder", help="ID|PATH (default: the one the version pairs with its encoder)."
    ),
    question_encoder_kind: str | None = typer.Option(None, "--question-encoder-kind", help="dpr|mean"),
    rag_model: str | None = typer.Option(
        None, "--rag-model", help="RAG checkpoint ID|PATH; without it /v1/generate answers 503."
    ),
    cache_dir: str | None = typer.Option(
        None, "--cache-dir", help="Base of the verified local file cache (default: RAGINDEX_CACHE_DIR, "
                                  "$XDG_CACHE_HOME/ragindex or ~/.cache/ragindex)."),
    header_timeout: float | None = typer.Option(
        None, "--header-timeout", help="Seconds a client has to send a request's head (default: 10)."
    ),
    body_timeout: float | None = typer.Option(
        None, "--body-timeout", help="Seconds a client has to send a request's body after its head (default: 30)."
    ),
    keep_alive: int | None = typer.Option(
        None, "--keep-alive", help="Seconds an idle connection stays open between requests (default: 5)."
    ),
    max_connections: int | None = typer.Option(
        None, "--max-connections", help="Connections (and requests in flight) before answering 503 (default: 256)."
    ),
    reverify_seconds: float = typer.Option(
        3600.0, "--reverify-seconds", help="Re-hash the served version's private copies this often, in seconds "
        "(0: never; they are stat'ed every few seconds either way)."),
    reverify_mib_per_second: float = typer.Option(
        64.0, "--reverify-mib-per-second", help="Read budget of a re-hash pass in MiB/s (CPU: ~4% of one core "
        "while a pass runs)."),
    log_level: str = typer.Option(
        "info", "--log-level", help="debug, info, warning or error. At info: one line per swap, refusal and "
        "rollback, and one access line per request, on stderr."
    ),
) -> None:
    """Serve /v1/retrieve and /v1/generate over the CURRENT version, hot-swapping on every promote."""
    from flows.settings import load_settings, open_store
    from rag_model.http_limits import ConnectionLimits

    if log_level.lower() not in LOG_LEVELS:
        raise RagindexError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    if question_encoder_kind not in (None, "dpr", "mean"):
        raise RagindexError(f"--question-encoder-kind must be dpr or mean, not {question_encoder_kind!r}")
    if port is not None and not 0 <= port <= 65535:
        raise RagindexError(f"--port must be between 0 and 65535, got {port}")
    if poll_seconds is not None and poll_seconds <= 0:
        raise RagindexError(f"--poll-seconds must be positive, got {poll_seconds}")
    if reverify_seconds < 0:
        raise RagindexError(f"--reverify-seconds must be 0 or more, got {reverify_seconds}")
    if reverify_mib_per_second <= 0:
        raise RagindexError(f"--reverify-mib-per-second must be positive, got {reverify_mib_per_second}")
    for flag, value in (("--header-timeout", header_timeout), ("--body-timeout", body_timeout),
                        ("--keep-alive", keep_alive), ("--max-connections", max_connections)):
        if value is not None and value <= 0:
            raise RagindexError(f"{flag} must be positive, got {value}")
    settings = load_settings()
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout if header_timeout is None else header_timeout,
        body_timeout_s=settings.body_timeout if body_timeout is None else body_timeout,
        keep_alive_s=settings.keep_alive if keep_alive is None else keep_alive,
        max_connections=settings.max_connections if max_connections is None else max_connections,
    )
    st = open_store(store, settings, must_exist=True)
    # Bound before anything expensive loads (and handed to uvicorn): a busy port is one line, at once.
    with listen_socket(host or settings.host, settings.port if port is None else port) as sock:
        import uvicorn

        from rag_model.http_limits import server_config
        from rag_model.server import create_app
        from tasks.takedown import take_down

        configure_server_logging(log_level.lower())
        # The settings default names a hub checkpoint; only an explicit choice turns generation on.
        chosen_rag = rag_model or (settings.rag_model if "rag_model" in settings.model_fields_set else None)
        app_ = create_app(
            st,
            question_encoder=question_encoder or settings.question_encoder,
            question_encoder_kind=question_encoder_kind,
            rag_model=chosen_rag,
            admin_token=settings.admin_token,
            poll_seconds=poll_seconds or settings.poll_seconds,
            cache_dir=cache_dir or settings.cache_base,
            cache_max_bytes=settings.cache_max_bytes,
            ready_grace_seconds=settings.ready_grace_seconds,
            reverify_seconds=reverify_seconds,
            reverify_bytes_per_second=reverify_mib_per_second * 2**20,
            takedown=take_down,
        )
        bind_host, bind_port = sock.getsockname()[:2]  # --port 0: the port the system chose
        shown_host = f"[{bind_host}]" if ":" in bind_host else bind_host
        print(f"ragindex serving {st.url} on http://{shown_host}:{bind_port} "
              f"(generation {'on: ' + chosen_rag if chosen_rag else 'off'}; "
              f"admin {'on' if settings.admin_token else 'off'})", file=sys.stderr)
        # uvicorn's own lines only from warning up (its access log is off): the access log is ours.
        uvicorn_level = "error" if log_level.lower() == "error" else "warning"
        uvicorn.Server(server_config(app_, bind_host, bind_port, limits, log_level=uvicorn_level)).run(sockets=[sock])
