"""Async jobs: ``POST /jobs`` queues captions, answers or embeddings for many images, ``GET /jobs/{id}`` shows
progress and results, ``GET /jobs/{id}/events`` streams them as server-sent events, ``GET /jobs`` lists the
caller's jobs, ``DELETE /jobs/{id}`` cancels. A job is its key's alone, on whichever replica it is asked for."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse

from ..budgets import check_chars
from ..deps import ApiKey, ServiceDep
from ..generation import options_from
from ..images import check_image_ref, indexed_id
from ..jobs import (
    FINAL,
    MODEL_FLAG,
    JobCancelled,
    JobCreated,
    JobList,
    JobRequest,
    JobStatus,
    StoreUnavailable,
    owner_of,
)

router = APIRouter(tags=["jobs"])
POLL_S = 0.2  # how often an event stream looks for news


async def _store(svc, fn: str, *args):
    """A job-store call off the event loop; 503 (retry) while the store cannot be reached."""
    try:
        return await asyncio.to_thread(getattr(svc.job_store, fn), *args)
    except StoreUnavailable as e:
        raise HTTPException(503, "the job store is unreachable for now; retry shortly", {"Retry-After": "1"}) from e


async def _check_runnable(svc, task: str) -> None:
    """400 unless a model here or a live worker elsewhere runs ``task``."""
    # a model here counts only when this process runs jobs (an API replica with --no-worker has models too)
    if (svc.jobs is not None and task in svc.jobs.tasks) or await _store(svc, "offers", task):
        return
    flag = MODEL_FLAG[task]
    where = " and no live worker runs these jobs (mmfusion worker --redis URL " + flag + " ...)" if (
        svc.settings.redis_url) else ""  # fmt: skip
    raise HTTPException(400, f"no {flag[2:]} is loaded{where}: start the service with {flag}")


@router.post("/jobs", status_code=202, response_model=JobCreated)
async def create_job(req: JobRequest, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """Queue captions, answers or embeddings for many images; poll ``GET /jobs/{id}`` for progress and results."""
    s = svc.settings
    await _check_runnable(svc, req.task)
    if req.task == "answer":
        if (req.question is None) == (req.questions is None):
            raise HTTPException(400, "answer jobs need exactly one of question (for every image) or questions")
        if req.questions is not None and len(req.questions) != len(req.images):
            raise HTTPException(400, f"{len(req.questions)} questions for {len(req.images)} images; "
                                     "give one per image, or one question")  # fmt: skip
    if len(req.images) > s.max_job_images:
        raise HTTPException(413, f"{len(req.images)} images in one job; the limit is {s.max_job_images}")
    options_from(req.max_tokens, req.temperature, req.top_p, req.seed, s.max_new_tokens)  # 400 now, not later
    check_chars([req.question, *(req.questions or ())], s)
    for ref in req.images:
        if isinstance(ref, str) and indexed_id(ref) is None:  # an id out of range is a 422 here, not a failed item
            check_image_ref(ref, s.allow_url_fetch, "jobs")
    job_id = await _store(svc, "create", owner_of(key), req.task, req.model_dump(), len(req.images))
    if svc.jobs is not None:
        svc.jobs.wake()
    return {"id": job_id, "status": "queued", "total": len(req.images), "url": f"/jobs/{job_id}"}


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def get_job(job_id: str, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """A job's status, progress and the results so far (only for the key that made it)."""
    job = await _store(svc, "get", job_id, owner_of(key))
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (for this API key)")
    return job


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, svc: ServiceDep, key: ApiKey) -> StreamingResponse:
    """The job as server-sent events: ``result`` ({item, result}) for each image as it finishes, ``progress``
    ({status, done, total}) when these change, and a last ``end`` (the job's summary) once it is over."""
    owner = owner_of(key)
    job = await _store(svc, "get", job_id, owner, False)  # exists for this key? (the stream reads the results)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (for this API key)")

    async def events() -> AsyncIterator[str]:
        cursor, last = None, None
        while True:
            try:
                job, new, cursor = await asyncio.to_thread(svc.job_store.follow, job_id, owner, cursor)
            except StoreUnavailable:  # Redis restarting: the stream waits for it rather than ending
                await asyncio.sleep(1.0)
                continue
            if job is None:
                return
            for item, result in new:
                yield _event("result", {"item": item, "result": result})
            if (job["status"], job["done"]) != last:
                last = job["status"], job["done"]
                yield _event("progress", {"status": job["status"], "done": job["done"], "total": job["total"]})
            if job["status"] in FINAL:
                yield _event("end", job)
                return
            if not new:
                await asyncio.sleep(POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


@router.get("/jobs", response_model=JobList)
async def list_jobs(svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """The caller's 100 newest jobs, without their results."""
    return {"jobs": await _store(svc, "list", owner_of(key))}


@router.delete("/jobs/{job_id}", response_model=JobCancelled)
async def cancel_job(job_id: str, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """Cancel a queued or running job (results so far are kept)."""
    status = await _store(svc, "cancel", job_id, owner_of(key))
    if status is None:
        raise HTTPException(404, f"no job {job_id!r} (for this API key)")
    return {"id": job_id, "status": status}


def _event(kind: str, body: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
