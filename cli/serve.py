"""`ragindex` commands: query (answer from the store, no server) and serve (the HTTP server)."""

from __future__ import annotations

import json
import sys

import typer

from cli.options import StoreOption
from storage.errors import RagindexError

app = typer.Typer()


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
) -> None:
    """Retrieve passages for TEXT straight from the store, without a server."""
    from flows.settings import load_settings, open_store
    from rag_model.query import query_store

    settings = load_settings()
    answer = query_store(
        open_store(store, settings), text, k, version,
        question_encoder or settings.question_encoder, question_encoder_kind,
        cache_dir=settings.cache_base, cache_max_bytes=settings.cache_max_bytes,
    )
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


@app.command("serve")
def serve(
    store: StoreOption = None,
    host: str | None = typer.Option(None, "--host", help="Interface (default: RAGINDEX_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default: RAGINDEX_PORT)."),
    poll_seconds: float | None = typer.Option(
        None, "--poll-seconds", help="How often to check CURRENT, in seconds (default: 10)."
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
) -> None:
    """Serve /v1/retrieve and /v1/generate over the CURRENT version, hot-swapping on every promote."""
    import uvicorn

    from flows.settings import load_settings, open_store
    from rag_model.http_limits import ConnectionLimits, server_config
    from rag_model.server import create_app

    if question_encoder_kind not in (None, "dpr", "mean"):
        raise RagindexError(f"--question-encoder-kind must be dpr or mean, not {question_encoder_kind!r}")
    if port is not None and not 0 <= port <= 65535:
        raise RagindexError(f"--port must be between 0 and 65535, got {port}")
    if poll_seconds is not None and poll_seconds <= 0:
        raise RagindexError(f"--poll-seconds must be positive, got {poll_seconds}")
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
    st = open_store(store, settings)
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
    )
    bind_host = host or settings.host
    bind_port = settings.port if port is None else port
    print(f"ragindex serving {st.url} on http://{bind_host}:{bind_port} "
          f"(generation {'on: ' + chosen_rag if chosen_rag else 'off'}; "
          f"admin {'on' if settings.admin_token else 'off'})", file=sys.stderr)
    uvicorn.Server(server_config(app_, bind_host, bind_port, limits)).run()
