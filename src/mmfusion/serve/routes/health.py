"""The service's own routes: ``GET /healthz`` (liveness and what is loaded) and ``GET /metrics`` (Prometheus).
Neither needs an API key, and the concurrency limit leaves them out, so probes work under load."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response

from ..deps import ServiceDep
from ..schemas import Health

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=Health)
async def healthz(svc: ServiceDep) -> dict[str, Any]:
    """Liveness and what is loaded."""
    images = videos = None
    if svc.index is not None:
        images, videos = await svc.in_index_thread(_counts, svc.index.store)
    gen = svc.generators
    return {"status": "ok", "model": svc.embedder_id if svc.embedder is not None else None, "images": images,
            "videos": videos,
            "index_version": getattr(svc.index, "version", None),
            "captioner": svc.model_name(gen.captioner), "answerer": svc.model_name(gen.answerer),
            "labels": svc.settings.labels, "auth": bool(svc.settings.api_keys),
            "uptime_s": round(time.time() - svc.started, 1)}  # fmt: skip


def _counts(store) -> tuple[int, int]:
    """(images, videos) in the index: a video is one file, searched by its segments."""
    videos = store.video_counts()["videos"]
    return store.count() - videos, videos


@router.get("/metrics")
async def metrics(svc: ServiceDep) -> Response:
    """Prometheus metrics: requests, latencies, batch sizes, queue depth, cache hits."""
    for name, b in svc.batchers.items():
        svc.metrics.queue.labels(name).set(b.stats.queue_depth)
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")
