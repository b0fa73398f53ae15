"""The HTTP service: OpenAI-compatible embeddings and chat, image search, zero-shot labels, jobs, health, metrics.

:func:`create_app` assembles the app: settings, middleware, error handlers, the routers of :mod:`.routes` and a
lifespan that opens the :class:`~.service.Service` (models, index, thread pools, job store, batchers) at start-up
and closes it at shutdown. Images come in as data URLs or uploads, never as paths or URLs to fetch (unless URL
fetching is enabled for chat and jobs), and files go out by id only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..utils import memory
from .batching import QueueFullError
from .limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware, HostCheckMiddleware, allowed_hosts
from .routes import ROUTERS
from .routes.page import mount_static
from .service import Service
from .settings import ServeSettings

log = logging.getLogger(__name__)
MAX_PROBLEMS = 20  # validation problems listed in a 422


def create_app(settings: ServeSettings | None = None, embedder=None, captioner=None, answerer=None) -> FastAPI:
    """The FastAPI app for ``settings``; nothing is loaded until it starts (its lifespan opens the service).

    Args:
        settings: how to serve (default: :class:`ServeSettings` from the environment's defaults).
        embedder, captioner, answerer: already-built models to serve; those not given are loaded at start-up by
            the names in the settings (the embedder defaults to the index's own model).
    """
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        memory.fix_mmap_threshold()  # large buffers freed go back to the system, not to a heap that keeps them
        svc = await Service.open(settings, embedder=embedder, captioner=captioner, answerer=answerer)
        app.state.service = svc
        try:
            yield
        finally:
            app.state.service = None
            await svc.close()

    app = FastAPI(
        title="mmfusion",
        version=_version(),
        description="Multimodal embeddings (OpenAI-compatible), image search and zero-shot labels.",
        lifespan=lifespan,
    )
    app.state.service = None
    _add_middleware(app, settings)
    _add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    mount_static(app)
    return app


def _add_middleware(app: FastAPI, settings: ServeSettings) -> None:
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    # added innermost first: a request meets the Host check, then the concurrency limit, then the body's limits
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, max_memory=settings.max_body_memory, on_idle=memory.trim
    )  # a burst of large bodies is over: give its memory back
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_concurrency, exempt=("/healthz", "/metrics"))
    app.add_middleware(HostCheckMiddleware, hosts=allowed_hosts(settings.host, settings.allowed_hosts))

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/static/"):  # the page's files: revalidate, so an upgrade shows at once
            response.headers["Cache-Control"] = "no-cache"
        svc = request.app.state.service
        if svc is not None:
            route = getattr(request.scope.get("route"), "path", "other")
            svc.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
            svc.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, ``{"error": {"message": ..., "type": ...}}``, which OpenAI clients read."""

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return JSONResponse({"error": {"message": "the model's queue is full; retry shortly", "type": "overloaded"}},
                            status_code=503, headers={"Retry-After": "1"})  # fmt: skip

    @app.exception_handler(StarletteHTTPException)  # ours, and the router's own (404 for unknown routes, 405)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error"}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        # the input is not echoed back: it may be megabytes, or hold NaN, which JSON cannot carry
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()[:MAX_PROBLEMS]]  # fmt: skip
        problems = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        more = len(exc.errors()) - len(errors)
        if more > 0:
            problems += f"; and {more} more"
        return JSONResponse({"error": {"message": f"invalid request: {problems}", "type": "invalid_request_error",
                                       "details": errors}}, status_code=422)  # fmt: skip

    @app.exception_handler(Exception)  # a bug: the client gets JSON without the process's internals; the log all
    async def internal_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": {"message": "internal error: the server's log says what went wrong",
                                       "type": "server_error"}}, status_code=500)  # fmt: skip


def _version() -> str:
    from ..version import __version__

    return __version__
