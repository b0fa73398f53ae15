"""Async jobs: ``POST /jobs`` queues captions or answers for many images, ``GET /jobs/{id}`` shows progress and
results, ``GET /jobs`` lists the caller's jobs, ``DELETE /jobs/{id}`` cancels. A job is its key's alone."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException

from ..budgets import check_chars
from ..deps import ApiKey, ServiceDep
from ..generation import options_from
from ..images import check_image_ref, indexed_id
from ..jobs import JobCancelled, JobCreated, JobList, JobRequest, JobStatus, owner_of

router = APIRouter(tags=["jobs"])


@router.post("/jobs", status_code=202, response_model=JobCreated)
async def create_job(req: JobRequest, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """Queue captions or answers for many images; poll ``GET /jobs/{id}`` for progress and results."""
    gen, s = svc.generators, svc.settings
    if req.task == "caption" and gen.captioner is None:
        raise HTTPException(400, "no captioner is loaded: start the service with --captioner")
    if req.task == "answer":
        if gen.answerer is None:
            raise HTTPException(400, "no answerer is loaded: start the service with --answerer")
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
    job_id = await asyncio.to_thread(svc.jobs.store.create, owner_of(key), req.task, req.model_dump(),
                                     len(req.images))  # fmt: skip
    svc.jobs.wake()
    return {"id": job_id, "status": "queued", "total": len(req.images), "url": f"/jobs/{job_id}"}


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def get_job(job_id: str, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """A job's status, progress and the results so far (only for the key that made it)."""
    job = await asyncio.to_thread(svc.jobs.store.get, job_id, owner_of(key))
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (for this API key)")
    return job


@router.get("/jobs", response_model=JobList)
async def list_jobs(svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """The caller's 100 newest jobs, without their results."""
    return {"jobs": await asyncio.to_thread(svc.jobs.store.list, owner_of(key))}


@router.delete("/jobs/{job_id}", response_model=JobCancelled)
async def cancel_job(job_id: str, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """Cancel a queued or running job (results so far are kept)."""
    status = await asyncio.to_thread(svc.jobs.store.cancel, job_id, owner_of(key))
    if status is None:
        raise HTTPException(404, f"no job {job_id!r} (for this API key)")
    return {"id": job_id, "status": status}
