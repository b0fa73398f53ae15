"""ASGI middleware that keeps the service up under abuse: a body-size limit and a concurrency limit.

Both are plain ASGI (no request object is built), so they act before FastAPI reads anything.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "request_error"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once when Content-Length says so, else as soon as the bytes read
    (a chunked upload, or a client sending more than it announced) pass the limit. The body is read here,
    at most ``max_bytes`` of it, and replayed to the app, so the app never sees a request it must abandon
    half-way (frameworks turn a failing body read into a confusing 400)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        msg = f"the request body is over the limit of {self.max_bytes:,} bytes"
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    return await _reply(send, 413, msg)
            except ValueError:
                return await _reply(send, 400, "Content-Length is not a number")
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                return await _reply(send, 413, msg)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say

        await self.app(scope, replay, send)


class ConcurrencyLimitMiddleware:
    """503 (with Retry-After) for requests beyond ``limit`` in flight, rather than slowing every request down."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()):
        self.app, self.limit, self.exempt = app, limit, exempt
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await _reply(send, 503, f"the service is busy ({self.limit} requests in flight); retry shortly",
                                [(b"retry-after", b"1")])  # fmt: skip
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
