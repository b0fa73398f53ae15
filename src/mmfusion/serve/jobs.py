"""Async jobs: captions, answers or embeddings for many images, kept in SQLite so they survive a restart.

``POST /jobs`` stores the request and answers at once with the job's id; one runner per service takes queued jobs
in order and works through their images, committing each result as it comes (``GET /jobs/{id}`` shows progress).
A job is visible only to the API key that made it (others get 404, as if it did not exist).

This module holds the embedded store (:class:`JobStore`, SQLite) and what every store shares: the request and
response bodies, the :class:`Jobs` interface the routes call, and :func:`run_item`, the work of one image. The
store on Redis, for many replicas and workers apart, is :mod:`.redis_jobs`; the settings pick one by ``redis_url``.

What happens when things go wrong:

- an image that cannot be read or a request the model refuses: that item gets an ``error``, the job goes on;
- the service stops cleanly: its running job goes back to the queue and continues where it was after a restart;
- the worker dies (killed, out of memory, power): the job's heartbeat stops, and any service on the same database
  marks it ``failed`` once the heartbeat is ``stale_s`` old (at start-up and every ``heartbeat_s`` after), so no job
  stays ``running`` forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import HTTPException
from pydantic import BaseModel, Field

from ..index.store import Transaction
from .chat import resolve_image
from .generation import Prompt, options_from
from .schemas import Body, ImageId

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,          -- a hash of the API key that made it ('' without keys)
    task TEXT NOT NULL,           -- caption | answer | embed
    status TEXT NOT NULL,         -- queued | running | done | failed | cancelled
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,               -- the worker's last sign of life while running
    worker TEXT,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,        -- the request body, JSON
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created);
CREATE TABLE IF NOT EXISTS job_results (
    job TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    item INTEGER NOT NULL,
    result TEXT NOT NULL,         -- JSON
    PRIMARY KEY (job, item)
);
"""
FINAL = ("done", "failed", "cancelled")
Task = Literal["caption", "answer", "embed"]


class JobRequest(Body):
    """Captions, answers or embeddings for many images."""

    task: Task = Field(description="caption each image, answer a question about each, or embed each")
    images: list[ImageId | str] = Field(
        min_length=1, description="indexed image ids, 'mmfusion://images/<id>' or data URLs (one result each)"
    )
    question: str | None = Field(None, description="answer: one question asked of every image")
    questions: list[str] | None = Field(None, description="answer: one question per image, in order")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None


class JobCreated(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    total: int = Field(description="images in the job")
    url: str = Field(description="where to poll: /jobs/{id}")


class JobSummary(BaseModel):
    """A job's status and progress (times are unix seconds; null until they happen)."""

    id: str
    task: Task
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    created: float
    started: float | None
    finished: float | None
    total: int
    done: int = Field(description="images finished so far")
    error: str | None = Field(description="why the job failed")


class JobStatus(JobSummary):
    results: list[dict[str, Any]] = Field(
        description="one per finished image, in order of the images: image, question, and caption, answer or "
        "embedding, or error"
    )


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="newest first, without results")


class JobCancelled(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"] = Field(description="after cancelling")


class StoreUnavailable(RuntimeError):
    """The job store cannot be reached now (Redis down or restarting): the route answers 503, retry shortly."""


def owner_of(key: str | None) -> str:
    return "" if key is None else hashlib.sha256(key.encode()).hexdigest()[:32]


JOB_FIELDS = ("id", "task", "status", "created", "started", "finished", "total", "done", "error")  # what GET shows


class Jobs(Protocol):
    """What the routes ask of a job store (SQLite here, Redis in :mod:`.redis_jobs`); methods block briefly."""

    def create(self, owner: str, task: str, request: dict[str, Any], total: int) -> str: ...

    def get(self, job_id: str, owner: str, with_results: bool = True) -> dict[str, Any] | None: ...

    def list(self, owner: str, limit: int = 100) -> list[dict[str, Any]]: ...

    def cancel(self, job_id: str, owner: str) -> str | None: ...

    def follow(self, job_id: str, owner: str, cursor: Any) -> tuple[dict[str, Any] | None, list, Any]:
        """(the job without results, [(item, result)] recorded since ``cursor`` (None: from the start), the next
        cursor); (None, [], cursor) when there is no such job for this owner. Never waits."""
        ...

    def offers(self, task: str) -> bool:
        """Whether a live worker elsewhere runs ``task`` (a store without a worker registry says False)."""
        ...

    def close(self) -> None: ...


class JobStore:
    """The jobs table. Every method is short and thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)

    def _tx(self, fn):
        with self._lock, Transaction(self._db) as db:
            return fn(db)

    def create(self, owner: str, task: str, request: dict[str, Any], total: int) -> str:
        job_id = uuid.uuid4().hex
        self._tx(lambda db: db.execute(
            "INSERT INTO jobs (id, owner, task, status, created, total, request) VALUES (?, ?, ?, 'queued', ?, ?, ?)",
            (job_id, owner, task, time.time(), total, json.dumps(request)),
        ))  # fmt: skip
        return job_id

    def get(self, job_id: str, owner: str, with_results: bool = True) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE id = ? AND owner = ?",
                                   (job_id, owner)).fetchone()  # fmt: skip
            if row is None:
                return None
            job = dict(zip(JOB_FIELDS, row))
            if with_results:
                rows = self._db.execute("SELECT result FROM job_results WHERE job = ? ORDER BY item", (job_id,))
                job["results"] = [json.loads(r) for (r,) in rows]
        return job

    def list(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        """The owner's newest jobs, without their results: one query."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE owner = ? ORDER BY created DESC "
                                    "LIMIT ?", (owner, limit)).fetchall()  # fmt: skip
        return [dict(zip(JOB_FIELDS, row)) for row in rows]

    def claim(self, worker: str) -> tuple[str, str, dict[str, Any], int] | None:
        """The oldest queued job, now running for ``worker``: (id, task, request, items already done)."""

        def take(db):
            row = db.execute("SELECT id, task, request, done FROM jobs WHERE status = 'queued' ORDER BY created "
                             "LIMIT 1").fetchone()  # fmt: skip
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET status = 'running', worker = ?, heartbeat = ?, started = COALESCE(started, ?) "
                       "WHERE id = ?", (worker, now, now, row[0]))  # fmt: skip
            return row[0], row[1], json.loads(row[2]), row[3]

        return self._tx(take)

    def add_result(self, job_id: str, worker: str, item: int, result: dict[str, Any]) -> bool:
        """Store one result and count it; False when the job is no longer this worker's (cancelled, reaped)."""

        def add(db):
            cur = db.execute("UPDATE jobs SET done = ?, heartbeat = ? WHERE id = ? AND worker = ? AND status = "
                             "'running'", (item + 1, time.time(), job_id, worker))  # fmt: skip
            if cur.rowcount == 0:
                return False
            db.execute("INSERT OR REPLACE INTO job_results (job, item, result) VALUES (?, ?, ?)",
                       (job_id, item, json.dumps(result, ensure_ascii=False)))  # fmt: skip
            return True

        return self._tx(add)

    def finish(self, job_id: str, worker: str, status: str, error: str | None = None) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ? AND worker = ? AND status = 'running'",
            (status, error, time.time(), job_id, worker)))  # fmt: skip

    def requeue(self, job_id: str, worker: str) -> None:
        """A clean stop: the job waits for the next service, which continues after its last result."""
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = 'queued', worker = NULL WHERE id = ? AND worker = ? AND status = 'running'",
            (job_id, worker)))  # fmt: skip

    def beat(self, job_id: str, worker: str) -> None:
        self._tx(lambda db: db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND worker = ?",
                                       (time.time(), job_id, worker)))  # fmt: skip

    def cancel(self, job_id: str, owner: str) -> str | None:
        """Cancel a queued or running job; its status afterwards (None: no such job for this owner)."""

        def cancel(db):
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND owner = ? AND status IN "
                       "('queued', 'running')", (time.time(), job_id, owner))  # fmt: skip
            row = db.execute("SELECT status FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)).fetchone()
            return None if row is None else row[0]

        return self._tx(cancel)

    def reap(self, stale_s: float) -> int:
        """Running jobs whose worker has been silent for ``stale_s`` seconds end as failed; how many did."""
        now = time.time()
        cur = self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE status = 'running' AND heartbeat < ?",
            (now, "the worker running this job stopped (the service was killed or crashed); submit the job again "
                  "to finish it", now - stale_s)))  # fmt: skip
        return cur.rowcount

    def follow(self, job_id: str, owner: str, cursor: int | None) -> tuple[dict[str, Any] | None, list, int | None]:
        """What :meth:`Jobs.follow` says; here the items run in order, so the cursor is the count seen."""
        job = self.get(job_id, owner, with_results=False)
        if job is None:
            return None, [], cursor
        start = cursor or 0
        with self._lock:
            rows = self._db.execute("SELECT item, result FROM job_results WHERE job = ? AND item >= ? ORDER BY item",
                                    (job_id, start)).fetchall()  # fmt: skip
        return job, [(i, json.loads(r)) for i, r in rows], start + len(rows)

    def offers(self, task: str) -> bool:
        return False

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JobRunner:
    """Works through queued jobs one at a time, item by item, on the service's generators."""

    def __init__(self, svc, store: JobStore, heartbeat_s: float, stale_s: float):
        self.svc, self.store = svc, store
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.worker = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tasks = [t for t in MODEL_FLAG if model_for(svc, t) is not None]  # what this process can run
        self.current: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        reaped = self.store.reap(self.stale_s)
        if reaped:
            log.warning("%d job(s) whose worker stopped are marked failed", reaped)
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(), name="mmfusion-jobs"),
                       asyncio.create_task(self._beat(), name="mmfusion-jobs-heartbeat")]  # fmt: skip

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop now: a running job goes back to the queue and continues after its last result (``grace`` is for
        the Redis runner's interface; a job here is whole, so there is no item to wait for)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if self.current is not None:
                    await asyncio.to_thread(self.store.beat, self.current, self.worker)
                await asyncio.to_thread(self.store.reap, self.stale_s)
            except sqlite3.Error as e:  # a busy or broken database: try again on the next beat
                log.warning("jobs heartbeat: %s", e)

    async def _run(self) -> None:
        while True:
            claimed = await asyncio.to_thread(self.store.claim, self.worker)
            if claimed is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                continue
            job_id, task, request, start = claimed
            self.current = job_id
            try:
                await self._work(job_id, task, request, start)
            except asyncio.CancelledError:  # the service is stopping: the next one continues this job
                await asyncio.to_thread(self.store.requeue, job_id, self.worker)
                raise
            except Exception as e:  # a bug or a broken model: the job fails with the reason, the runner goes on
                log.exception("job %s failed", job_id)
                why = f"the service failed on this job ({type(e).__name__}; its log says more)"
                await asyncio.to_thread(self.store.finish, job_id, self.worker, "failed", why)
            finally:
                self.current = None

    async def _work(self, job_id: str, task: str, request: dict[str, Any], start: int) -> None:
        req = JobRequest(**request)
        if model_for(self.svc, task) is None:
            why = f"this service has no {MODEL_FLAG[task][2:]}"
            await asyncio.to_thread(self.store.finish, job_id, self.worker, "failed", why)
            return
        for i in range(start, len(req.images)):
            result = await run_item(self.svc, task, req, i)
            if not await asyncio.to_thread(self.store.add_result, job_id, self.worker, i, result):
                return  # cancelled (or reaped) meanwhile: stop working on it
        await asyncio.to_thread(self.store.finish, job_id, self.worker, "done")


MODEL_FLAG = {"caption": "--captioner", "answer": "--answerer", "embed": "--model"}  # what loads each task's model


def model_for(svc, task: str):
    """The model of ``svc`` that runs ``task``, or None."""
    if task == "embed":
        return svc.embedder
    return svc.generators.captioner if task == "caption" else svc.generators.answerer


async def run_item(svc, task: str, req: JobRequest, i: int) -> dict[str, Any]:
    """The result of image ``i`` of a job: image, question, and caption, answer or embedding, or error (an image
    that cannot be read, a request the model refuses). Every runner, of every store, runs items through here."""
    ref = image_ref(req.images[i])
    result: dict[str, Any] = {"image": shown_ref(ref, i)}
    question = None if task != "answer" else (req.questions[i] if req.questions else req.question)
    if question is not None:
        result["question"] = question
    try:
        img = await resolve_image(svc, ref)
        if task == "embed":
            (vec,) = await svc.embed_images([img])
            result["embedding"] = [float(x) for x in vec]
        else:
            opts = options_from(req.max_tokens, req.temperature, req.top_p, req.seed, svc.settings.max_new_tokens)
            role = "captioner" if task == "caption" else "answerer"
            text = await svc.generators.generate(role, Prompt(images=[img], question=question), opts)
            result["caption" if task == "caption" else "answer"] = text
    except HTTPException as e:
        result["error"] = str(e.detail)
    return result


def image_ref(ref: int | str) -> str:
    return f"mmfusion://images/{ref}" if isinstance(ref, int) else ref


def shown_ref(ref: str, i: int) -> str:
    """How an image is named in results: ids as given, data URLs by their position (not their bytes)."""
    return ref if ref.startswith(("mmfusion://", "http://", "https://")) else f"images[{i}]"
