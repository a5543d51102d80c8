"""Mounting the console on the serving app: its routers and the Content-Security-Policy of its pages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.security import HTTPBearer

from rag_model.console.api import api_router
from rag_model.console.data import ConsoleData
from rag_model.console.pages import pages_router

# Our own script and stylesheet only: no inline script or style, nothing from another origin, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _ConsoleHeaders:
    """Adds the CSP (unless a response set its own, like the charts) and no-sniff to every /ui response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (scope["path"] == "/ui" or scope["path"].startswith("/ui/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CSP.encode()))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def mount_console(app: FastAPI, serving: Any, bearer: HTTPBearer, is_admin: Callable[[Any], bool],
                  require_admin: Callable[..., None], cache_dir: str | None = None) -> ConsoleData:
    """`/ui` and the console's `/v1` JSON on `app`, reading `serving.store` and asking with its retriever."""
    retriever = serving.retriever
    data = ConsoleData(serving.store, retriever.encode, lambda: retriever.expected_fingerprint_key, cache_dir)
    app.include_router(api_router(data, bearer, is_admin, require_admin, lambda: serving.watcher.check(True)))
    app.include_router(pages_router(data, lambda: retriever.version))
    app.add_middleware(_ConsoleHeaders)
    return data
