"""ASGI middleware that keeps the service up under abuse: a Host allowlist, a concurrency limit, a body-size
limit and a memory budget for bodies.

All are plain ASGI (no request object is built), so they act before FastAPI reads anything. The app stacks them
outermost first: Host, concurrency, body; a request refused by one costs nothing of the next.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections import deque
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SMALL_BODY = 64 * 1024  # bodies up to this are read without waiting for the memory budget


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "request_error"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class ByteBudget:
    """A first-come, first-served budget of bytes: :meth:`acquire` waits until ``n`` bytes are free."""

    def __init__(self, limit: int):
        self.limit, self.used = max(1, limit), 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, n: int, timeout: float) -> int | None:
        """Hold ``n`` bytes (at most the whole budget); the bytes held, or None after ``timeout`` seconds."""
        n = min(n, self.limit)
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return n
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except BaseException as e:
            if fut.done() and not fut.cancelled():  # granted as the wait ended: give the bytes back
                self.release(n)
            self._grant()  # it may have been the head of the queue
            if isinstance(e, TimeoutError):
                return None
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():  # given up waiting
                self._waiters.popleft()
            elif self.used + n <= self.limit:
                self._waiters.popleft()
                self.used += n
                fut.set_result(None)
            else:
                break


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once when Content-Length says so, else as soon as the bytes read
    (a chunked upload, or a client sending more than it announced) pass the limit. The body is read here,
    at most ``max_bytes`` of it, and replayed to the app, so the app never sees a request it must abandon
    half-way (frameworks turn a failing body read into a confusing 400).

    Memory: a body over 64 KiB is read only once ``max_memory`` bytes of bodies in flight leave room for it
    (its Content-Length, or ``max_bytes`` when sent chunked), and its bytes stay counted until its response is
    sent, since parsing and decoding it take a few times its size. Until then it waits unread in the
    connection (the server stops reading a socket whose data is not taken), so a burst of large uploads costs
    at most the budget, and ``on_idle`` (e.g. returning freed memory to the system) runs when the last large
    body's request is done. A body that waits over ``wait_s`` gets 503.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_memory: int | None = None, wait_s: float = 60.0,
                 on_idle: Callable[[], object] | None = None):  # fmt: skip
        self.app, self.max_bytes, self.wait_s, self.on_idle = app, max_bytes, wait_s, on_idle
        self.budget = ByteBudget(max_memory if max_memory else 2 * max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        held = [0]  # the budget's bytes this request holds
        try:
            await self._handle(scope, receive, send, held)
        finally:
            if held[0]:
                self.budget.release(held[0])
                if self.budget.used == 0 and self.on_idle is not None:
                    self.on_idle()

    async def _hold(self, n: int, send: Send, held: list[int]) -> bool:
        got = await self.budget.acquire(n, self.wait_s)
        if got is None:
            await _reply(send, 503, "the service is busy reading other large requests; retry shortly",
                         [(b"retry-after", b"2")])  # fmt: skip
            return False
        held[0] = got
        return True

    async def _handle(self, scope: Scope, receive: Receive, send: Send, held: list[int]) -> None:
        """Read, check and replay the body, holding budget bytes for it in ``held``."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        msg = f"the request body is over the limit of {self.max_bytes:,} bytes"
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _reply(send, 400, "Content-Length is not a number")
            if n > self.max_bytes:
                return await _reply(send, 413, msg)
            if n > SMALL_BODY and not await self._hold(n, send, held):
                return
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                return await _reply(send, 413, msg)
            if seen > SMALL_BODY and not held[0] and not await self._hold(self.max_bytes, send, held):
                return  # a chunked body (no Content-Length) that turned out large: it waits its turn
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body, chunks = b"".join(chunks), None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, body
            if not replayed:
                replayed = True
                message, body = {"type": "http.request", "body": body, "more_body": False}, b""
                return message
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


class HostCheckMiddleware:
    """400 for a request whose Host header names a host the service does not answer to.

    DNS rebinding: a web page on a hostile name that the attacker then resolves to 127.0.0.1 could otherwise
    read this service from the user's own browser, keys or none; its requests carry the hostile name as Host.
    IP addresses are always answered (a rebinding page cannot make its Host an address), and so are the names
    in :func:`allowed_hosts`.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str]):
        self.app = app
        names = {_bare(h) for h in hosts}
        self.any = "*" in names
        self.suffixes = tuple(h[1:] for h in names if h.startswith("*."))  # "*.example.com" -> ".example.com"
        self.names = frozenset(h for h in names if not h.startswith("*"))

    def allows(self, host: str) -> bool:
        name = _bare(host)
        if self.any or name in self.names or name.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            return await self.app(scope, receive, send)
        host = next((v for k, v in scope.get("headers") or () if k == b"host"), None)
        if host is None or not self.allows(host.decode("latin-1")):
            what = "no Host header" if host is None else f"Host {host.decode('latin-1')[:100]!r} is not served here"
            return await _reply(send, 400, f"{what}: use an address this service answers to, or add the name "
                                           "to its allowed_hosts (--allowed-host NAME)")  # fmt: skip
        await self.app(scope, receive, send)


def _bare(host: str) -> str:
    """A Host value or allowlist entry without port, brackets, trailing dot or case: '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> list[str]:
    """The names the service answers to: localhost (and its subdomains, which resolve to loopback), the bound
    address, ``extra``, and this machine's names when bound to every interface."""
    hosts = ["localhost", "*.localhost", bound, *extra]
    if bound in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
    return hosts
