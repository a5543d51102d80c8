"""The console's pages (`/ui`): HTML rendered on the server from the same data as the JSON endpoints.

Every page is a GET and changes nothing; actions are forms our script sends as POSTs to the admin
endpoints. Nothing here shows a filesystem path: the pages are for anyone who reaches the server."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from rag_model.console.charts import CHARTS, chart_key, chart_versions
from rag_model.console.data import ConsoleData, Freshness
from rag_model.redact import without_paths
from storage.errors import InvalidName, NotFound, RagindexError

OVERVIEW_VERSIONS = 50  # rows on the overview; /ui/versions lists them all
CHANGES_SHOWN = 200  # pages per kind of change on a version page
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_STATUS = ((NotFound, 404), (InvalidName, 404))


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def environment() -> Environment:
    env = Environment(loader=PackageLoader("rag_model.console", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(size=_size, when=_when, ratio=_ratio)
    return env


def pages_router(data: ConsoleData, serving_version: Callable[[], str | None]) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    env = environment()

    def html(template: str, code: int = 200, **context: Any) -> HTMLResponse:
        body = env.get_template(template).render(serving=serving_version(), **context)
        return HTMLResponse(body, status_code=code)

    def not_found(message: str) -> HTMLResponse:
        return html("error.html", 404, status=404, message=message)

    async def page(template: str, read: Callable[[], dict[str, Any]]) -> HTMLResponse:
        """`read` runs off the event loop; a store error becomes a readable page with its 4xx."""
        try:
            context = await run_in_threadpool(read)
        except RagindexError as exc:
            status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 400)
            message = without_paths(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                                    data.store.url)
            return html("error.html", status, status=status, message=message)
        return html(template, **context)

    @router.get("/ui")
    async def overview() -> HTMLResponse:
        def read() -> dict[str, Any]:
            catalog = data.catalog()
            current = next((v for v in catalog.versions if v.current), None)
            charted = chart_versions(catalog)
            return {"catalog": catalog, "current": current, "freshness": Freshness.of(current),
                    "versions": catalog.versions[:OVERVIEW_VERSIONS], "total": len(catalog.versions),
                    "chart_key": chart_key(charted), "charted": len(charted)}

        return await page("overview.html", read)

    @router.get("/ui/versions")
    async def versions() -> HTMLResponse:
        return await page("versions.html", lambda: {"versions": data.catalog().versions})

    @router.get("/ui/versions/{version_id}")
    async def version(version_id: str) -> HTMLResponse:
        def read() -> dict[str, Any]:
            catalog = data.catalog()
            entry = data.entry(version_id, catalog)
            if entry.corrupt:
                return {"entry": entry, "manifest": None, "diff": None}
            manifest = data.manifest(version_id)
            present = {v.version for v in catalog.versions if not v.corrupt}
            parent = manifest.parent if manifest.parent in present else None
            return {"entry": entry, "manifest": manifest, "diff": data.diff(parent, version_id) if parent else None,
                    "shown": CHANGES_SHOWN,
                    "location": without_paths(manifest.source.location or "", data.store.url),
                    "question_encoder": without_paths(manifest.question_encoder or "", data.store.url),
                    "encoder_id": without_paths(manifest.encoder.model_id, data.store.url),
                    "checks": without_paths(manifest.validation.checks if manifest.validation else {},
                                            data.store.url)}

        return await page("version.html", read)

    @router.get("/ui/compare")
    async def compare(q: str = Query("", max_length=2000), a: str = Query("", max_length=200),
                      b: str = Query("", max_length=200), k: int = Query(5, ge=1, le=100)) -> HTMLResponse:
        def read() -> dict[str, Any]:
            catalog = data.catalog()
            ready = [v.version for v in catalog.versions if v.status == "ready"]
            context: dict[str, Any] = {"q": q, "a": a, "b": b, "k": k, "ready": ready, "comparison": None,
                                       "diff": None}
            if a and b:
                context["diff"] = data.diff(a, b)
                if q.strip():
                    context["comparison"] = data.compare(q, a, b, k)
            return context

        return await page("compare.html", read)

    @router.get("/ui/history")
    async def history() -> HTMLResponse:
        return await page("history.html", lambda: {"history": data.history(),
                                                   "holds": data.store.holds(include_released=True)})

    @router.get("/ui/charts/{name}.svg")
    async def chart(name: str) -> Response:
        if name not in CHARTS:
            return not_found(f"no chart {name!r}")
        svg = await run_in_threadpool(lambda: data.chart(name, CHARTS[name], chart_versions(data.catalog())))
        # The SVG keeps matplotlib's own <style>; an image runs no script, so only its styles are allowed.
        return Response(svg, media_type="image/svg+xml", headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "Cache-Control": "no-cache"})

    @router.get("/ui/static/{name}")
    async def static(name: str) -> Response:
        kind = STATIC_TYPES.get(name[name.rfind("."):]) if "." in name else None
        asset = resources.files("rag_model.console").joinpath("static", name)
        if kind is None or "/" in name or not asset.is_file():
            return not_found(f"no file {name!r}")
        return Response(asset.read_bytes(), media_type=kind, headers={"Cache-Control": "max-age=300"})

    @router.get("/ui/{rest:path}")
    async def unknown(rest: str) -> HTMLResponse:
        return not_found("no such page in the console")

    return router
