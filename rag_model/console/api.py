"""The console's JSON: what its pages are built from, and the admin actions its buttons send.

Read-only endpoints answer anyone but show no filesystem path without the admin token (the rule
`GET /v1/index` follows); the actions need the token as a bearer header, like the other admin endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from rag_model.console.data import ConsoleData
from rag_model.redact import without_paths
from rag_model.retriever import events

MAX_QUERY_CHARS = 2000
ACTOR = "ragindex-console"  # who the history and the serving events name for the console's actions


class VersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(..., min_length=1, max_length=200)


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"query": "who wrote hamlet", "a": "enwiki-20240601-20240603t020000z",
         "b": "enwiki-20240604-20240605t020000z", "k": 5}]})

    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS)
    a: str = Field(..., min_length=1, max_length=200)
    b: str = Field(..., min_length=1, max_length=200)
    k: int = Field(5, ge=1, le=100)


def api_router(data: ConsoleData, bearer: HTTPBearer, is_admin: Callable[[Any], bool],
               require_admin: Callable[..., None], on_move: Callable[[], Any]) -> APIRouter:
    """`on_move` runs after an action moved CURRENT (the server swaps to it at once)."""
    router = APIRouter(tags=["console"])

    def shown(value: Any, credentials: HTTPAuthorizationCredentials | None) -> Any:
        return value if is_admin(credentials) else without_paths(value, data.store.url)

    @router.get("/v1/versions", summary="The store's catalogue: CURRENT, every version, lineage, bytes, holds")
    async def versions(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        catalog = await run_in_threadpool(data.catalog)
        return shown(catalog.to_json(), credentials)

    @router.get("/v1/versions/{version_id}", summary="One version's catalogue entry and manifest")
    async def version(version_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        def read() -> dict:
            entry = data.entry(version_id)
            return {"entry": entry.to_json(), "manifest": data.manifest(version_id).model_dump(mode="json")}

        return shown(await run_in_threadpool(read), credentials)

    @router.get("/v1/history", summary="Every promote and rollback, newest first, and the rollback holds")
    async def history() -> dict:
        def read() -> dict:
            return {"history": [h.model_dump(mode="json") for h in data.history()],
                    "holds": [h.model_dump(mode="json") for h in data.store.holds(include_released=True)]}

        return await run_in_threadpool(read)

    @router.get("/v1/diff", summary="Pages added, changed and removed from version a to version b")
    async def diff(a: str = Query(..., max_length=200), b: str = Query(..., max_length=200)) -> dict:
        return (await run_in_threadpool(data.diff, a, b)).to_json()

    @router.post("/v1/compare", summary="One question answered by two versions, entered/left top-k marked")
    async def compare(body: CompareRequest) -> dict:
        return (await run_in_threadpool(data.compare, body.query, body.a, body.b, body.k)).to_json()

    def moved(pointer: Any) -> dict:
        on_move()
        return {"current": pointer.model_dump(mode="json", exclude={"hold"})}

    @router.post("/v1/admin/promote", tags=["admin"], dependencies=[Depends(require_admin)],
                 summary="Point CURRENT at a ready version (compare-and-swap) and swap to it")
    async def promote(body: VersionRequest) -> dict:
        def do() -> Any:
            before = data.store.current()
            pointer = data.store.promote(body.version, actor=ACTOR, reason="POST /v1/admin/promote")
            events.warning("CURRENT promoted from %s to %s (generation %d)", before.version if before else None,
                           pointer.version, pointer.generation, extra={"event": "promote", "fields": {
                               "from": before.version if before else None, "to": pointer.version,
                               "generation": pointer.generation, "actor": ACTOR}})
            return pointer

        return moved(await run_in_threadpool(do))

    @router.post("/v1/admin/pin", tags=["admin"], dependencies=[Depends(require_admin)],
                 summary="Keep a version through gc")
    async def pin(body: VersionRequest) -> dict:
        await run_in_threadpool(data.store.pin, body.version)
        events.info("version %s pinned", body.version, extra={"event": "pin", "fields": {
            "version": body.version, "actor": ACTOR}})
        return {"pinned": body.version}

    @router.post("/v1/admin/unpin", tags=["admin"], dependencies=[Depends(require_admin)],
                 summary="Let gc delete a version again")
    async def unpin(body: VersionRequest) -> dict:
        await run_in_threadpool(data.store.unpin, body.version)
        events.info("version %s unpinned", body.version, extra={"event": "unpin", "fields": {
            "version": body.version, "actor": ACTOR}})
        return {"unpinned": body.version}

    return router
