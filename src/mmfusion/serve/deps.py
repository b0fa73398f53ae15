"""The dependencies every route takes: the running :class:`Service` and the caller's API key.

Routes declare them as parameters, ``svc: ServiceDep`` and ``key: ApiKey``, and FastAPI fills them in per request;
no route reaches for the service any other way.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from .service import Service


def get_service(request: Request) -> Service:
    """The service the app's lifespan opened (kept on ``app.state``)."""
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        raise HTTPException(503, "the service is not started: run the app with its lifespan (uvicorn does)")
    return svc


ServiceDep = Annotated[Service, Depends(get_service)]


def authorized(request: Request, svc: ServiceDep) -> str | None:
    """The caller's API key (None when the service has no keys); 401 without a valid one."""
    keys = svc.settings.api_keys
    if not keys:
        return None
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if key not in keys:
        raise HTTPException(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    return key


ApiKey = Annotated[str | None, Depends(authorized)]


def need_embedder(svc: Service):
    """The embedder, or 503 when none is loaded."""
    if svc.embedder is None:
        raise HTTPException(503, "no model is loaded: start the service with --model or --db")
    return svc.embedder


def need_index(svc: Service):
    """The index, or 404 when none is served."""
    if svc.index is None:
        raise HTTPException(404, "no index is served: start the service with --db DIR")
    return svc.index
