"""What the service accepts at the door, before any route runs: request content types, body size, cross-origin calls.

- A POST / PUT / PATCH must be JSON or msgpack (415 otherwise): the bodies a web page can send cross-site without
  a CORS preflight (text/plain, forms, a Blob without a type) never reach a route.
- A body is counted as it arrives and refused (413) as soon as it passes the limit, or at once when its
  Content-Length says it will; it is never read whole first.
- CORS is off unless origins are configured; then only those origins get the CORS headers (docs/architecture.md).
- Once the `Gate` is closed (the service is stopping), a new request gets 503 with Retry-After while those in flight
  finish: a shutdown never cuts a request off (deployments/cli.py drains the ingress before stopping Serve).
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.failures import RETRY_AFTER

BODY_CONTENT_TYPES = ("application/json", "application/msgpack")
BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass
class Gate:
    """Whether new requests are let in, and how many are in flight (the `Door` middleware keeps both)."""

    open: bool = True
    in_flight: int = 0

    async def close(self, timeout_s: float, quiet_s: float = 0.5) -> int:
        """Let no new request in; wait up to `timeout_s` until none has been in flight for `quiet_s` (requests still
        on their way from the proxy arrive and get their 503, answers travel back). Returns how many still run."""
        self.open = False
        loop = asyncio.get_running_loop()
        deadline, quiet_since = loop.time() + timeout_s, loop.time()
        while loop.time() < deadline:
            if self.in_flight:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= quiet_s:
                break
            await asyncio.sleep(0.05)
        return self.in_flight


class Door:
    """Pure ASGI middleware: counts HTTP requests until their response is sent; 503 for new ones once the gate closed."""

    def __init__(self, app: ASGIApp, gate: Gate):
        self.app, self.gate = app, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.gate.open:
            refused = JSONResponse({"detail": "the service is shutting down; retry shortly"}, status_code=503,
                                   headers={**RETRY_AFTER, "Connection": "close"})
            return await refused(scope, receive, send)
        self.gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.in_flight -= 1


def install_limits(app: FastAPI, *, max_body_bytes: int, cors_origins: Sequence[str] = (), gate: Gate | None = None) -> None:
    """Add the door checks to `app`: content types and the body limit, the shutdown `gate` outside them, and
    outermost CORS for `cors_origins` (exact origins such as ``https://tools.example.org``; none: no CORS headers at
    all, the browser's default)."""
    app.add_middleware(BodyLimits, max_body_bytes=max_body_bytes)
    if gate is not None:
        app.add_middleware(Door, gate=gate)
    if cors_origins:  # added last, so outermost: a refused request still carries the origin's CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["X-Graph-Id", "Location", "Retry-After"])


def media_type(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The Content-Type's media type, lower case and without parameters; None when there is none."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return None


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimits:
    """Pure ASGI middleware (no buffering of its own): 415 for a body that is not JSON or msgpack, 413 for one
    longer than `max_body_bytes` — from Content-Length before reading, else when the counted bytes pass it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        kind = media_type(headers)
        if kind not in BODY_CONTENT_TYPES:
            await JSONResponse({"detail": f"unsupported content type {kind!r}: send {' or '.join(BODY_CONTENT_TYPES)}"},
                               415)(scope, receive, send)
            return
        declared = content_length(headers)
        if declared is not None and declared > self.max_body_bytes:
            await self.too_large(declared)(scope, receive, send)
            return
        await self.app(scope, self.counted(receive), send)

    def too_large(self, size: int | str) -> JSONResponse:
        return JSONResponse({"detail": f"request body of {size} bytes exceeds {self.max_body_bytes}"}, 413,
                            headers={"Connection": "close"})

    def counted(self, receive: Receive) -> Receive:
        """`receive` that raises HTTPException(413) — answered by the app's own handler — once the body passes
        the limit, so the reader (`Request.body()`) stops with at most one chunk more than the limit in memory."""
        seen = 0

        async def receive_counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, f"request body of more than {self.max_body_bytes} bytes",
                                        headers={"Connection": "close"})
            return message

        return receive_counted
