"""The HTTP server: retrieval (and generation, given a RAG model) over a hot-swapping index.

Concurrency: `/v1/retrieve` requests are queued to one micro-batching thread that encodes their
questions together and searches the index once per batch (off the event loop; one version per
batch); `/v1/generate` runs in a worker thread and `RagService` serializes model calls. The
watcher thread follows CURRENT and swaps versions without stopping either.

Longer than ~400 lines because it is one FastAPI app: the nine endpoints, their request models and
the batcher share the app's state, and splitting them would only pass that state around.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from rag_model.console import mount_console
from rag_model.http_limits import BodyLimitMiddleware
from rag_model.index import Hit
from rag_model.metrics import ServerMetrics
from rag_model.redact import without_paths
from rag_model.retriever import (
    HotSwapRetriever,
    NotReady,
    RetrievalResult,
    SwapResult,
    events,
    paired_question_encoder_factory,
)
from rag_model.served_bytes import (
    DEFAULT_BYTES_PER_SECOND,
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_STAT_SECONDS,
    ServedBytesChecker,
)
from rag_model.watcher import CurrentWatcher
from storage.errors import Conflict, InvalidName, NotFound, RagindexError, Rejected
from storage.store import IndexStore

# One record per request: method, path (never its query string or headers), status, duration.
access_log = logging.getLogger("ragindex.access")

MAX_QUERY_CHARS = 2000
MAX_K = 100
MAX_N_DOCS = 20
MAX_NEW_TOKENS = 256
DEFAULT_MAX_BODY_BYTES = 64 * 1024


# -- request / response models -------------------------------------------------------------------


def _has_words(query: str) -> str:
    if not query.strip():
        raise ValueError("query is only whitespace")
    return query


QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS, description="The question."),
                      AfterValidator(_has_words)]


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "who wrote hamlet", "k": 5}]})

    query: QueryText
    k: int = Field(5, ge=1, le=MAX_K, description="How many passages to return.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"query": "who wrote hamlet", "n_docs": 5, "mode": "sequence",
                                         "max_new_tokens": 32}]},
    )

    query: QueryText
    n_docs: int = Field(5, ge=1, le=MAX_N_DOCS, description="Passages the generator conditions on.")
    mode: Literal["sequence", "token"] = Field("sequence", description="RAG-Sequence or RAG-Token decoding.")
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{}, {"version": "enwiki-20240601-20240603t020000z"}]}
    )

    version: str | None = Field(None, max_length=200, description="Version to go back to; default: the previous one.")


class TakedownRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"page": "12345", "reason": "court order 2024-117"}]}
    )

    page: Annotated[str, Field(min_length=1, max_length=300, coerce_numbers_to_str=True,
                               description="Page id, or the exact title CURRENT serves.")]
    reason: Annotated[str, Field(min_length=1, max_length=2000, description="Why: kept in the deny-list and history."),
                      AfterValidator(_has_words)]


class RetrieveResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "version": "enwiki-20240601-20240603t020000z", "query": "who wrote hamlet", "took_ms": 3.1,
        "hits": [{"row_id": 17, "score": 81.2, "passage_id": "1234_0", "page_id": 1234, "rev_id": 99887766,
                  "title": "Hamlet", "text": "Hamlet is a tragedy written by William Shakespeare ...",
                  "url": "https://en.wikipedia.org/w/index.php?curid=1234&oldid=99887766",
                  "version": "enwiki-20240601-20240603t020000z"}]}]})

    version: str
    query: str
    took_ms: float
    hits: list[Hit]


class GenerateResponse(BaseModel):
    version: str
    query: str
    mode: str
    answer: str
    took_ms: float
    docs: list[Hit]


# -- batched searching ---------------------------------------------------------------------------


class SearchBatcher:
    """One thread that answers queued retrievals in batches: one encode and one index search each."""

    def __init__(self, retriever: HotSwapRetriever, metrics: ServerMetrics | None = None,
                 max_batch: int = 32, max_wait_s: float = 0.002) -> None:
        self.retriever = retriever
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> SearchBatcher:
        self._thread = threading.Thread(target=self._run, name="ragindex-search-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)

    def submit(self, query: str, k: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((query, k, future))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[tuple[str, int, concurrent.futures.Future]]) -> None:
        try:
            index = self.retriever.index  # one version for the whole batch
            vectors = self.retriever.encode([q for q, _, _ in batch])
            scores, ids = index.search_ids(vectors, max(k for _, k, _ in batch))
            if self.metrics:
                self.metrics.batch_size.observe(len(batch))
            for i, (_, k, future) in enumerate(batch):
                future.set_result(RetrievalResult(index.version, [index.hits(scores[i, :k], ids[i, :k])]))
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)


# -- the app ---------------------------------------------------------------------------------------


@dataclass
class Serving:
    """Everything one app serves with; `app.state.serving`."""

    store: IndexStore
    retriever: HotSwapRetriever
    watcher: CurrentWatcher
    batcher: SearchBatcher
    metrics: ServerMetrics
    checker: ServedBytesChecker  # keeps the served version's bytes verified while it is served
    service: Any = None  # rag_model.model.RagService when a RAG model is configured
    admin_token: str | None = None
    started_at: float = field(default_factory=time.time)
    ready_grace_seconds: float = 60.0  # how long /readyz stays ready while CURRENT cannot be served
    # tasks.takedown.take_down, handed in by the edge (`ragindex serve`): serving may not import tasks/.
    takedown: Callable[..., Any] | None = None


def create_app(
    store: IndexStore,
    *,
    question_encoder: str | None = None,
    question_encoder_kind: str | None = None,
    rag_model: str | None = None,
    admin_token: str | None = None,
    poll_seconds: float = 10.0,
    cache_dir: str | None = None,
    expected_fingerprint_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = 32,
    service: Any = None,
    ready_grace_seconds: float = 60.0,
    cache_max_bytes: int | None = None,
    reverify_seconds: float = DEFAULT_INTERVAL_SECONDS,
    reverify_bytes_per_second: float = DEFAULT_BYTES_PER_SECOND,
    reverify_stat_seconds: float = DEFAULT_STAT_SECONDS,
    takedown: Callable[..., Any] | None = None,
    console: bool = True,
) -> FastAPI:
    """Build the app. Loading the RAG model (if any) happens here; the index loads in the watcher
    thread once the app starts, so `/readyz` says when it can answer. The served copies are stat'ed every
    `reverify_stat_seconds` and re-hashed every `reverify_seconds` (0: never) at `reverify_bytes_per_second`
    (`rag_model.served_bytes`). `console`: the operator's pages under /ui and the JSON they read
    (`rag_model.console`)."""
    metrics = ServerMetrics()
    if service is None and rag_model:
        from rag_model.model import RagService

        service = RagService.from_pretrained(rag_model, cache_dir=cache_dir,
                                             expected_fingerprint_key=expected_fingerprint_key)
    if service is not None:
        retriever = service.retriever
    else:
        retriever = HotSwapRetriever(
            question_encoder_factory=paired_question_encoder_factory(question_encoder, question_encoder_kind),
            expected_fingerprint_key=expected_fingerprint_key,
            cache_dir=cache_dir,
        )
    retriever.swap_listeners.append(metrics.on_swap)
    retriever.cache_max_bytes = cache_max_bytes
    serving = Serving(
        store=store,
        retriever=retriever,
        watcher=CurrentWatcher(store, retriever, poll_seconds),
        checker=ServedBytesChecker(store, retriever, interval_seconds=reverify_seconds,
                                   bytes_per_second=reverify_bytes_per_second, stat_seconds=reverify_stat_seconds),
        batcher=SearchBatcher(retriever, metrics, max_batch=max_batch),
        metrics=metrics,
        service=service,
        admin_token=admin_token or None,
        ready_grace_seconds=ready_grace_seconds,
        takedown=takedown,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.batcher.start()
        serving.watcher.start()
        serving.checker.start()
        try:
            yield
        finally:
            serving.checker.stop()
            serving.watcher.stop()
            serving.batcher.stop()

    app = FastAPI(
        title="ragindex",
        version="0.1.0",
        description="Retrieval and RAG generation over a Wikipedia index that hot-swaps to each promoted version.",
        lifespan=lifespan,
    )
    app.state.serving = serving
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # added last = outermost: counts 413s too
    bearer = HTTPBearer(auto_error=False, description="RAGINDEX_ADMIN_TOKEN")

    def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not serving.admin_token:
            raise HTTPException(403, "admin endpoints are disabled: no RAGINDEX_ADMIN_TOKEN is configured")
        if credentials is None or not credentials.credentials:
            raise HTTPException(401, "admin endpoint: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not _is_admin(serving, credentials):
            raise HTTPException(403, "wrong admin token")

    @app.post("/v1/retrieve", response_model=RetrieveResponse, tags=["serving"],
              summary="Passages for a question, with provenance and the index version that answered")
    async def retrieve(body: RetrieveRequest) -> dict:
        start = time.perf_counter()
        result = await asyncio.wrap_future(serving.batcher.submit(body.query, body.k))
        return {"version": result.version, "query": body.query, "took_ms": _ms(start),
                "hits": [h.to_dict() for h in result.hits[0]]}

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["serving"],
              summary="An answer from the RAG model, the passages it used and the index version",
              responses={503: {"description": "no RAG model configured, or no index loaded yet"}})
    async def generate(body: GenerateRequest) -> dict:
        if serving.service is None:
            raise HTTPException(503, "generation is disabled: this server was started without a RAG model "
                                     "(start it with --rag-model ID|PATH); /v1/retrieve works")
        start = time.perf_counter()
        result = await run_in_threadpool(serving.service.generate, body.query, body.n_docs, body.mode,
                                         body.max_new_tokens)
        return {"version": result.version, "query": body.query, "mode": body.mode, "answer": result.answer,
                "took_ms": _ms(start), "docs": [h.to_dict() for h in result.docs]}

    @app.get("/v1/index", tags=["index"], summary="The serving version, the last swap and any failed one "
                                                  "(filesystem paths only with the admin token)")
    async def index_status(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        status = await run_in_threadpool(_index_status, serving)
        return status if _is_admin(serving, credentials) else without_paths(status, serving.store.url)

    @app.post("/v1/admin/reload", tags=["admin"], dependencies=[Depends(require_admin)],
              summary="Read CURRENT now and (re-)open it, every file hashed again, even the version serving")
    async def reload() -> dict:
        serving_before = serving.retriever.version
        result = await run_in_threadpool(serving.watcher.check, True, True)
        if result and not result.ok and result.version == serving_before:
            # The store's files no longer verify; whether what is served still does is another question.
            mismatched = await run_in_threadpool(serving.checker.mismatched_now)
            if mismatched:
                serving.checker.problem = f"served bytes of {result.version} no longer match: {', '.join(mismatched)}"
        return {"swap": result.to_dict() if result else None, "serving": serving.retriever.version}

    @app.post("/v1/admin/rollback", tags=["admin"], dependencies=[Depends(require_admin)],
              summary="Point CURRENT back at an earlier version (default: the previous one) and swap to it",
              response_model=None)
    async def rollback(body: RollbackRequest | None = None) -> dict | JSONResponse:
        version = body.version if body else None

        def do() -> tuple[Any, SwapResult | None]:
            pointer = serving.store.rollback(version, actor="ragindex-server", reason="POST /v1/admin/rollback")
            events.warning("CURRENT rolled back from %s to %s (generation %d)", pointer.previous, pointer.version,
                           pointer.generation, extra={"event": "rollback", "fields": {
                               "from": pointer.previous, "to": pointer.version, "generation": pointer.generation,
                               "actor": "ragindex-server"}})
            return pointer, serving.watcher.check(True)

        pointer, result = await run_in_threadpool(do)
        # store.rollback is the one rollback path (the server may not import tasks/): it made the hold, and
        # refused (409, CURRENT unchanged) a version whose lineage does not verify.
        body = {"current": pointer.model_dump(mode="json"), "swap": result.to_dict() if result else None,
                "serving": serving.retriever.version,
                "hold": pointer.hold.model_dump(mode="json") if pointer.hold else None}
        if result is not None and not result.ok:  # CURRENT moved, but this server could not load it: not a 200
            return JSONResponse({"detail": f"CURRENT is now {pointer.version}, but this server could not load it "
                                           f"and still serves {body['serving']}: {result.error}", **body},
                                status_code=409)
        return body

    @app.post("/v1/admin/takedown", tags=["admin"], dependencies=[Depends(require_admin)],
              summary="Take a page down now: deny-list it, publish and promote a version without it, swap to it",
              responses={404: {"description": "CURRENT serves no such page"},
                         503: {"description": "takedown is not configured in this server"}})
    async def takedown(body: TakedownRequest) -> dict:
        if serving.takedown is None:
            raise HTTPException(503, "takedown is disabled in this server (start it with `ragindex serve`)")

        def do() -> tuple[Any, SwapResult | None]:
            result = serving.takedown(serving.store, body.page, body.reason, actor="ragindex-server")
            events.warning("%s", result.describe(), extra={"event": "takedown", "fields": {
                "page_id": result.takedown.page_id, "version": result.version, "actor": "ragindex-server"}})
            return result, serving.watcher.check(True)

        result, swap = await run_in_threadpool(do)
        return {**result.to_json(), "swap": swap.to_dict() if swap else None, "serving": serving.retriever.version}

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"],
             summary="200 once an index version is loaded and CURRENT is served (within a grace period), else 503",
             responses={503: {"description": "no index loaded yet, or CURRENT refused for longer than the grace"}})
    async def readyz() -> JSONResponse:
        version = serving.retriever.version
        if version is None:
            return JSONResponse({"ready": False, "version": None}, status_code=503)
        if serving.checker.problem:  # answering, but from bytes no longer verified
            return JSONResponse({"ready": False, "version": version, "error": serving.checker.problem},
                                status_code=503)
        behind = serving.watcher.behind_for()
        if behind > serving.ready_grace_seconds:  # still answering, but not from the version CURRENT names
            failure = serving.retriever.last_failure
            return JSONResponse({"ready": False, "version": version, "current": serving.watcher.current_version,
                                 "behind_seconds": round(behind, 3), "error": failure.error if failure else None},
                                status_code=503)
        return JSONResponse({"ready": True, "version": version})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if console:
        mount_console(app, serving, bearer, lambda credentials: _is_admin(serving, credentials), require_admin,
                      cache_dir=cache_dir)
    return app


def _index_status(serving: Serving) -> dict:
    current = serving.retriever.current
    try:
        pointer = serving.store.current()
        store_current = pointer.model_dump(mode="json") if pointer else None
    except Exception as exc:  # the status page must answer even when the store does not
        store_current = {"error": str(exc)}
    r = serving.retriever
    return {
        "ready": current is not None,
        "serving": current.summary() if current else None,
        "store": {"url": serving.store.url, "current": store_current},
        "fingerprint_key": r.expected_fingerprint_key,
        "last_swap": r.last_swap.to_dict() if r.last_swap else None,
        "last_failure": r.last_failure.to_dict() if r.last_failure else None,
        "last_error": r.last_failure.error if r.last_failure else None,  # one line: the last refused version
        "behind_seconds": round(serving.watcher.behind_for(), 3),  # not serving CURRENT for this long
        "watcher": {"poll_seconds": serving.watcher.poll_seconds, "last_error": serving.watcher.last_error},
        "served_bytes": serving.checker.status(),
        "generation_enabled": serving.service is not None,
    }


def _is_admin(serving: Serving, credentials: HTTPAuthorizationCredentials | None) -> bool:
    token = serving.admin_token
    return bool(token and credentials and credentials.credentials
                and secrets.compare_digest(credentials.credentials.encode(), token.encode()))


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


# -- errors --------------------------------------------------------------------------------------

_STATUS_FOR = ((NotReady, 503), (NotFound, 404), (InvalidName, 400), (Conflict, 409), (Rejected, 409))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RagindexError)
    async def ragindex_error(request: Request, exc: RagindexError) -> JSONResponse:
        status = next((code for cls, code in _STATUS_FOR if isinstance(exc, cls)), 400)
        return JSONResponse({"detail": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__},
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body"}, status_code=400)
        simple = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
                  for e in errors]
        first = simple[0]
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        return JSONResponse({"detail": f"invalid {where}: {first['msg']}", "errors": simple}, status_code=422)


class _MetricsMiddleware:
    """Counts and times every request for /metrics, and writes its access log line."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"  # templates only: bounded label values
            self.metrics.requests.labels(route=name, status=str(status)).inc()
            self.metrics.latency.labels(route=name).observe(seconds)
            client = scope.get("client")
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000, extra={
                "event": "request", "fields": {
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": seconds * 1000, "client": client[0] if client else None}})
