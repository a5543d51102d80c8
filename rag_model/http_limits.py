"""What a slow or greedy client may hold: read deadlines per request and a cap on connections.

uvicorn has no timeout for receiving a request: `timeout_keep_alive` covers only the idle time between
requests and is reset by every byte, so a client that trickles its headers or body one byte at a time
holds a connection for ever, and ASGI middleware cannot help because it runs after the head is parsed.
`DeadlineH11Protocol` closes a connection whose request head is not complete `header_timeout_s` after
the connection opened (or after the first byte of a kept-alive request), or whose body is not complete
`body_timeout_s` after the head. `limit_concurrency` then bounds what the remaining clients can hold:
past it, uvicorn answers 503 at once instead of queueing. `BodyLimitMiddleware` bounds what a request
that does arrive in time may send.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """The serving edge's limits (their defaults are settings: RAGINDEX_HEADER_TIMEOUT and so on)."""

    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: int
    max_connections: int


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request's head, then its body."""

    limits: ConnectionLimits  # set per server by protocol_for()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "head" or "body" while a deadline runs

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._waiting_for is None and self.conn.their_state is h11.IDLE:
            self._arm("head", self.limits.header_timeout_s)  # the first byte of a kept-alive request
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse a pipelined request already buffered
        self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._arm("body", self.limits.body_timeout_s)
        elif state is not h11.IDLE:  # the whole request is in (or the connection is done): no deadline
            self._disarm()

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._expire, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._waiting_for = None

    def _expire(self, what: str, seconds: float) -> None:
        self._deadline = None
        self._waiting_for = None
        if not self.transport.is_closing():
            log.warning("closing a connection from %s: request %s not received within %gs",
                        self.client and self.client[0], what, seconds)
            self.transport.close()


class BodyLimitMiddleware:
    """413 for a body over the limit, whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises HTTPException from body reading as is
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def protocol_for(limits: ConnectionLimits) -> type[DeadlineH11Protocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""
    return type("LimitedH11Protocol", (DeadlineH11Protocol,), {"limits": limits})


def server_config(app: Any, host: str, port: int, limits: ConnectionLimits,
                  log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration `ragindex serve` runs with: these limits on every connection."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_for(limits),
                          limit_concurrency=limits.max_connections, timeout_keep_alive=limits.keep_alive_s)
