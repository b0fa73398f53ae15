"""Jobs on Redis: many API replicas enqueue, workers anywhere take one image at a time, each result kept once.

Why Redis Streams with consumer groups rather than arq, RQ, Celery or taskiq: those libraries model a task as one
function call whose return value is the result. A job here is many items whose results must show up as they
arrive (``GET /jobs/{id}``, ``/jobs/{id}/events``), be recorded exactly once even when an item runs twice, and
move to another worker when the one running it dies. Streams give exactly those pieces on the server itself:
XREADGROUP hands each item to one consumer, an item stays pending until XACK, XAUTOCLAIM takes over items idle
longer than a visibility timeout, and a short Lua script records a result with HSETNX, so a retried item never
writes a second one. A library on top would hide the per-item acknowledgement we need, for nothing in return.

Layout (``{id}`` is a hash tag: a job's keys share one cluster slot, so its scripts run on one node):

- ``mmfusion:job:{id}``: a hash, the job's fields (owner, task, status, times, total, done, error, request) and
  ``tries:<item>``, how many times a worker started that item;
- ``mmfusion:job:{id}:results``: a hash, item -> result JSON (HSETNX: the first result of an item wins);
- ``mmfusion:job:{id}:order``: a list of items in the order their results came (the cursor of the event stream);
- ``mmfusion:owner:<owner>``: a sorted set of the owner's job ids by creation time;
- ``mmfusion:queue:<task>``: a stream of ``{job, item}`` entries, consumer group ``workers``; a worker reads only
  the tasks it has a model for;
- ``mmfusion:workers``: a hash, worker -> its tasks and last heartbeat (API replicas check that a task has a
  live worker before accepting a job of it).

Failure semantics: a worker shows it is alive by re-claiming its current entry every heartbeat (resetting its
idle time); an entry idle for ``stale_s`` (the visibility timeout) is taken by another worker. An item started
``max_attempts`` times by workers that all stopped fails its job with the reason; nothing ever marks a job done
but the recording of its last item's result. A worker stopping cleanly hands its item back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .cache import LRU
from .jobs import JOB_FIELDS, MODEL_FLAG, JobRequest, StoreUnavailable, image_ref, model_for, run_item, shown_ref

log = logging.getLogger(__name__)

PREFIX = "mmfusion:"
GROUP = "workers"
TASKS = tuple(MODEL_FLAG)  # the tasks a job can have, as the SQLite runner knows them

# KEYS: job, results. ARGV: item, max attempts, now, worker. -> {verdict, request}
START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'gone', ''} end
if st ~= 'queued' and st ~= 'running' then return {'skip', ''} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'skip', ''} end
local n = redis.call('HINCRBY', KEYS[1], 'tries:' .. ARGV[1], 1)
if n > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished', ARGV[3], 'error',
    'image ' .. ARGV[1] .. ' was started ' .. (n - 1) .. ' times by workers that stopped before finishing it ' ..
    '(killed, out of memory?); results so far are kept: submit the rest again, perhaps with smaller images')
  return {'failed', ''}
end
if st == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[3]) end
return {'go', redis.call('HGET', KEYS[1], 'request')}
"""
# KEYS: job, results, order. ARGV: item, result, now. -> 1 recorded, 0 not (a result exists, or the job is over)
RECORD = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[1])
local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
if done >= tonumber(redis.call('HGET', KEYS[1], 'total')) then
  redis.call('HSET', KEYS[1], 'status', 'done', 'finished', ARGV[3])
end
return 1
"""
# KEYS: job. ARGV: owner, now. -> the status after cancelling, or nil when the owner has no such job
CANCEL = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[2])
  st = 'cancelled'
end
return st
"""

# KEYS: queue. ARGV: group, worker, entry id. -> 1 the entry is this worker's (its idle time reset), 0 it was
# acknowledged meanwhile, -1 another worker took it
BEAT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] then return 0 end
if p[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  return 1
end
return -1
"""


def _job(job_id: str) -> str:
    return f"{PREFIX}job:{{{job_id}}}"


def _queue(task: str) -> str:
    return f"{PREFIX}queue:{task}"


def _summary(values: list[str | None]) -> dict[str, Any]:
    """A job hash's JOB_FIELDS (strings) as the types the API shows."""
    job = dict(zip(JOB_FIELDS, values))
    for k in ("created", "started", "finished"):
        job[k] = float(job[k]) if job[k] not in (None, "") else None
    job["total"], job["done"] = int(job["total"]), int(job["done"] or 0)
    job["error"] = job["error"] or None
    return job


def connect(url: str, decode: bool = True, timeout: float = 5.0):
    """A redis-py client for ``url`` with short timeouts (a Redis that went away fails fast, never hangs)."""
    try:
        import redis
    except ImportError as e:
        raise RuntimeError("--redis needs redis-py: pip install 'mmfusion[redis]'") from e
    return redis.Redis.from_url(url, decode_responses=decode, socket_timeout=timeout, socket_connect_timeout=2.0,
                                health_check_interval=30)  # fmt: skip


def _unavailable(fn):
    """Turn Redis connection errors into :class:`StoreUnavailable` (the routes answer 503)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        import redis

        try:
            return fn(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"the job store (Redis) cannot be reached: {e}") from e

    return wrapper


class RedisJobStore:
    """The :class:`~.jobs.Jobs` interface on Redis, plus what workers call (take, start, record, ack)."""

    def __init__(self, url: str, stale_s: float = 30.0, max_attempts: int = 3):
        self.url, self.stale_s, self.max_attempts = url, stale_s, max_attempts
        self.r = connect(url)
        self._start, self._record, self._cancel, self._beat = (
            self.r.register_script(s) for s in (START, RECORD, CANCEL, BEAT)
        )
        self._groups: set[str] = set()
        self._turn = 0  # the queue take() reads first (they take turns)

    # ---- the API side ---------------------------------------------------------------------------------------

    @_unavailable
    def create(self, owner: str, task: str, request: dict[str, Any], total: int) -> str:
        """The job and one queue entry per image, in one transaction: all of it exists, or none."""
        job_id, now = uuid.uuid4().hex, time.time()
        self._ensure_group(task)
        with self.r.pipeline(transaction=True) as p:
            p.hset(_job(job_id), mapping={"id": job_id, "owner": owner, "task": task, "status": "queued",
                                          "created": repr(now), "total": total, "done": 0,
                                          "request": json.dumps(request)})  # fmt: skip
            p.zadd(f"{PREFIX}owner:{owner}", {job_id: now})
            for i in range(total):
                p.xadd(_queue(task), {"job": job_id, "item": i})
            p.execute()
        return job_id

    @_unavailable
    def get(self, job_id: str, owner: str, with_results: bool = True) -> dict[str, Any] | None:
        with self.r.pipeline(transaction=False) as p:
            p.hmget(_job(job_id), [*JOB_FIELDS, "owner"])
            if with_results:
                p.hgetall(_job(job_id) + ":results")
            values, *rest = p.execute()
        if values[0] is None or values[-1] != owner:
            return None
        job = _summary(values[:-1])
        if with_results:
            job["results"] = [json.loads(v) for _, v in sorted(rest[0].items(), key=lambda kv: int(kv[0]))]
        return job

    @_unavailable
    def list(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        ids = self.r.zrevrange(f"{PREFIX}owner:{owner}", 0, limit - 1)
        with self.r.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hmget(_job(job_id), JOB_FIELDS)
            rows = p.execute()
        return [_summary(v) for v in rows if v[0] is not None]

    @_unavailable
    def cancel(self, job_id: str, owner: str) -> str | None:
        return self._cancel(keys=[_job(job_id)], args=[owner, repr(time.time())])

    @_unavailable
    def follow(self, job_id: str, owner: str, cursor: int | None) -> tuple[dict[str, Any] | None, list, int | None]:
        """What :meth:`~.jobs.Jobs.follow` says; the cursor is a position in the job's list of recorded items."""
        start = cursor or 0
        with self.r.pipeline(transaction=False) as p:
            p.hmget(_job(job_id), [*JOB_FIELDS, "owner"])
            p.lrange(_job(job_id) + ":order", start, -1)
            values, items = p.execute()
        if values[0] is None or values[-1] != owner:
            return None, [], cursor
        results = self.r.hmget(_job(job_id) + ":results", items) if items else []
        return _summary(values[:-1]), [(int(i), json.loads(r)) for i, r in zip(items, results)], start + len(items)

    @_unavailable
    def offers(self, task: str) -> bool:
        """Whether a worker that runs ``task`` showed it is alive within ``stale_s``."""
        now = time.time()
        for raw in self.r.hvals(f"{PREFIX}workers"):
            w = json.loads(raw)
            if task in w["tasks"] and now - w["beat"] < self.stale_s:
                return True
        return False

    def close(self) -> None:
        self.r.close()

    # ---- the worker side --------------------------------------------------------------------------------------

    def _ensure_group(self, task: str) -> None:
        import redis

        if task in self._groups:
            return
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
            self.r.xgroup_create(_queue(task), GROUP, id="0", mkstream=True)
        self._groups.add(task)

    def take(self, worker: str, tasks: list[str], block_ms: int) -> tuple[str, str, str, int] | None:
        """The next item for ``worker``: (task, entry id, job id, item). Items whose worker has been silent for
        the visibility timeout come first (XAUTOCLAIM), then new ones (XREADGROUP, waiting up to ``block_ms``)."""
        import redis

        for task in tasks:
            self._ensure_group(task)
            _, entries, *_ = self.r.xautoclaim(_queue(task), GROUP, worker, int(self.stale_s * 1000), "0-0", count=1)
            for entry_id, fields in entries:
                if fields:  # an entry deleted meanwhile comes back empty
                    log.warning("took over image %s of job %s from a silent worker", fields["item"], fields["job"])
                    return task, entry_id, fields["job"], int(fields["item"])
        # COUNT is per stream: a read of several queues can deliver one entry of each, and an entry delivered but
        # not worked on waits the visibility timeout. So each queue is read alone first (in turn, for fairness),
        # and only when all are empty does one read wait on all of them; what else it delivers is handed back.
        first, self._turn = self._turn % len(tasks), self._turn + 1
        try:
            for task in tasks[first:] + tasks[:first]:
                got = self.r.xreadgroup(GROUP, worker, {_queue(task): ">"}, count=1)
                if got:
                    break
            else:
                got = self.r.xreadgroup(GROUP, worker, {_queue(t): ">" for t in tasks}, count=1, block=block_ms)
        except redis.ResponseError as e:  # NOGROUP: Redis lost its data (no AOF?): make the groups again
            self._groups.clear()
            raise StoreUnavailable(f"the job queues are gone from Redis ({e}); making them again") from e
        taken = [(stream[len(PREFIX + "queue:") :], entry_id, fields["job"], int(fields["item"]))
                 for stream, entries in got or () for entry_id, fields in entries]  # fmt: skip
        for extra in taken[1:]:
            self.hand_back(*extra, started=False)
        return taken[0] if taken else None

    def start(self, job_id: str, item: int, worker: str) -> tuple[str, dict[str, Any] | None]:
        """('go', request) when the item should run now; ('skip' | 'gone' | 'failed', None) when not."""
        keys = [_job(job_id), _job(job_id) + ":results"]
        verdict, request = self._start(keys=keys, args=[item, self.max_attempts, repr(time.time()), worker])
        return verdict, json.loads(request) if verdict == "go" else None

    def record(self, job_id: str, item: int, result: dict[str, Any]) -> bool:
        """Keep the item's result unless it already has one or the job is over; True when this one was kept."""
        keys = [_job(job_id), _job(job_id) + ":results", _job(job_id) + ":order"]
        return bool(self._record(keys=keys, args=[item, json.dumps(result, ensure_ascii=False), repr(time.time())]))

    def ack(self, task: str, entry_id: str) -> None:
        with self.r.pipeline(transaction=True) as p:
            p.xack(_queue(task), GROUP, entry_id)
            p.xdel(_queue(task), entry_id)  # an acknowledged entry is not needed again: the stream stays small
            p.execute()

    def hand_back(self, task: str, entry_id: str, job_id: str, item: int, started: bool = True) -> None:
        """A clean stop: the item goes back to the queue at once, and its start (if ``started``) is not counted."""
        with self.r.pipeline(transaction=True) as p:
            p.xack(_queue(task), GROUP, entry_id)
            p.xdel(_queue(task), entry_id)
            p.xadd(_queue(task), {"job": job_id, "item": item})
            if started:
                p.hincrby(_job(job_id), f"tries:{item}", -1)
            p.execute()

    def beat(self, worker: str, tasks: list[str], current: tuple[str, str] | None) -> bool:
        """Show ``worker`` alive, and keep its current entry (task, entry id) from looking idle; False when that
        entry went to another worker meanwhile (this one was silent too long: its result may still be the one)."""
        now = time.time()
        self.r.hset(f"{PREFIX}workers", worker, json.dumps({"tasks": tasks, "beat": now}))
        mine = True
        if current is not None:
            task, entry_id = current
            mine = self._beat(keys=[_queue(task)], args=[GROUP, worker, entry_id]) != -1
        for name, raw in self.r.hgetall(f"{PREFIX}workers").items():  # forget workers gone for long
            if now - json.loads(raw)["beat"] > 10 * self.stale_s:
                self.r.hdel(f"{PREFIX}workers", name)
        return mine

    def leave(self, worker: str) -> None:
        self.r.hdel(f"{PREFIX}workers", worker)


class RedisJobRunner:
    """Takes items of the tasks this process has models for, one at a time, until stopped."""

    def __init__(self, svc, store: RedisJobStore, heartbeat_s: float):
        self.svc, self.store, self.heartbeat_s = svc, store, heartbeat_s
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tasks = [t for t in TASKS if model_for(svc, t) is not None]
        self.current: tuple[str, str] | None = None  # (task, entry id) being worked on
        self.items = 0  # items finished by this runner
        self._started = False  # whether the current item's start was counted
        self._requests = LRU(8)  # recent jobs' parsed requests
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmfusion-redis-jobs")  # its blocking reads
        self._stopping = False
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if not self.tasks:
            return  # no model for any task: nothing to take
        self._stopping = False
        self._tasks = [asyncio.create_task(self._run(), name="mmfusion-redis-jobs"),
                       asyncio.create_task(self._beat(), name="mmfusion-redis-heartbeat")]  # fmt: skip

    def wake(self) -> None:
        """Nothing to do: a blocked XREADGROUP wakes by itself when an item is added."""

    async def stop(self, grace: float = 0.0) -> None:
        """Stop taking items; wait up to ``grace`` seconds for the current one, then hand it back unfinished."""
        self._stopping = True
        if grace > 0 and self._tasks:
            await asyncio.wait([self._tasks[0]], timeout=grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.leave, self.worker)
        self._tasks = []
        self._pool.shutdown(wait=False)

    async def _beat(self) -> None:
        warned = False
        while True:
            try:
                current = self.current
                if not await asyncio.to_thread(self.store.beat, self.worker, self.tasks, current):
                    log.warning("job item %s went to another worker (this one was silent too long)", current)
                warned = False
            except Exception as e:  # Redis away: the next beat tries again
                if not warned:
                    log.warning("worker heartbeat failed (%s); retrying every %.1f s", e, self.heartbeat_s)
                warned = True
            await asyncio.sleep(self.heartbeat_s)

    async def _run(self) -> None:
        loop, down = asyncio.get_running_loop(), False
        while not self._stopping:
            try:
                got = await loop.run_in_executor(self._pool, self.store.take, self.worker, self.tasks, 500)
                if down:
                    log.warning("Redis is back: taking job items again")
                down = False
            except Exception as e:  # Redis away or restarting: wait and try again, never exit
                if not down:
                    log.warning("cannot take job items from Redis (%s); retrying", e)
                down = True
                await asyncio.sleep(0.5)
                continue
            if got is None:
                continue
            task, entry_id, job_id, item = got
            if self._stopping:  # taken while stopping: back to the queue at once
                await self._retry(self.store.hand_back, task, entry_id, job_id, item, False)
                return
            self.current, self._started = (task, entry_id), False
            try:
                await self._item(task, entry_id, job_id, item)
            except asyncio.CancelledError:  # stopping mid-item: another worker takes it now, not after a timeout
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.hand_back, task, entry_id, job_id, item, self._started)
                raise
            except Exception:  # a bug, or Redis refusing a command: the item stays pending, to be taken again
                log.exception("job %s image %d: the worker failed; it is retried after the visibility timeout",
                              job_id, item)  # fmt: skip
                await asyncio.sleep(0.5)
            finally:
                self.current = None

    async def _item(self, task: str, entry_id: str, job_id: str, item: int) -> None:
        verdict, request = await self._retry(self.store.start, job_id, item, self.worker)
        self._started = verdict == "go"
        if verdict == "go":
            req = self._request(job_id, request)
            try:
                result = await run_item(self.svc, task, req, item)
            except Exception as e:  # a broken model: that image gets the reason, the job goes on
                log.exception("job %s image %d failed", job_id, item)
                why = f"the worker failed on this image ({type(e).__name__}; its log says more)"
                result = {"image": shown_ref(image_ref(req.images[item]), item), "error": why}
            await self._retry(self.store.record, job_id, item, result)
            self.items += 1
        elif verdict == "failed":
            log.warning("job %s failed: image %d was started too many times", job_id, item)
        await self._retry(self.store.ack, task, entry_id)

    def _request(self, job_id: str, request: dict[str, Any]) -> JobRequest:
        req = self._requests.get(job_id)
        if req is None:
            req = JobRequest(**request)
            self._requests.put(job_id, req)
        return req

    async def _retry(self, fn, *args):
        """``fn(*args)`` in a thread, again every half second while Redis is away (a finished result is kept
        until it can be written; the item stays pending meanwhile, so nothing is lost)."""
        import redis

        warned = False
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if not warned:
                    log.warning("Redis unreachable (%s); retrying every 0.5 s", e)
                warned = True
                await asyncio.sleep(0.5)
