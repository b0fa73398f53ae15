"""Dynamic micro-batching of blocking model calls for an asyncio server.

The idea of Clipper (Crankshaw et al., NSDI 2017) and of the dynamic batchers in Triton and TorchServe: requests
that arrive close together are gathered into one model call, which costs little more than a call for one. The
first waiting item opens a batch; more are added until ``max_batch_size`` items or until ``max_wait_ms`` has passed
since that first item arrived. The model runs in a single worker thread (a model is not re-entrant, and torch
already uses the CPU cores), so the event loop stays free; items that arrive meanwhile form the next batch, so under
load batches fill up with no waiting at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..index.encoder import split_by_length  # noqa: F401 - moved to the query encoder; kept importable here

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    """Too many items are waiting for the model; the HTTP layer answers 503 with Retry-After."""


@dataclass
class BatcherStats:
    """A snapshot of a batcher's counters, for /metrics."""

    batches: int = 0  # model calls made (failed ones included)
    items: int = 0  # items passed to the model
    queue_depth: int = 0  # items waiting now (not yet in a batch)
    batch_size_histogram: dict[int, int] = field(default_factory=dict)  # batch size -> number of calls
    errors: int = 0  # model calls that raised or returned the wrong number of results
    busy_seconds: float = 0.0  # time spent inside the model function


@dataclass(eq=False)
class _Entry:
    item: Any
    future: asyncio.Future
    enqueued: float  # loop.time() when submitted: max_wait counts from the batch's first item


_STOP = object()  # queued by stop(): what is before it is drained, then the collector ends


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent ``submit`` calls into batched calls of a blocking function.

    Args:
        fn: the model call, ``fn(items) -> results``, one result per item in the same order (any sized iterable
            works; a tensor or array yields its rows). It blocks, and runs in ``executor``. An exception raised
            fails the whole batch; an exception *returned* as an item's result fails that item only.
        max_batch_size: the most items per call; 1 turns batching off (one call per item).
        max_wait_ms: how long the first item of a batch waits for company before the call starts.
        max_queue: the most items waiting (not yet in a running batch); beyond it ``submit`` raises
            :class:`QueueFullError` at once.
        name: names the worker thread and the log lines.
        executor: where ``fn`` runs; by default a thread pool of one worker that the batcher owns (and shuts down
            in :meth:`stop`). Give a one-worker executor to keep one model call at a time.
        on_batch: called on the event loop after each call of ``fn`` with the batch size and the seconds spent in
            ``fn`` (the server feeds Prometheus with it); its exceptions are logged and ignored.

    Use it from one event loop: ``start()`` binds it to the running loop (``submit`` does so lazily) and
    ``await stop()`` drains it; ``async with MicroBatcher(...) as b:`` does both. After ``stop()`` it may be started
    again, on any loop.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        name: str = "batcher",
        executor: concurrent.futures.Executor | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1 (1 turns batching off), got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.fn, self.name, self.on_batch = fn, name, on_batch
        self.max_batch_size, self.max_wait_ms, self.max_queue = max_batch_size, max_wait_ms, max_queue
        self._given_executor = executor
        self._executor: concurrent.futures.Executor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._batch: list[_Entry] = []  # the batch being gathered or inside fn now
        self._stopping = False
        self._waiting = 0
        self._stats = BatcherStats()

    # ---- life cycle ---------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the collector task is running."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the collector task on the running event loop (a no-op when already started).

        Raises:
            RuntimeError: outside a running event loop, while the batcher runs on another loop, or while it stops.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(f"MicroBatcher {self.name!r}: start() needs a running event loop") from None
        if self._stopping:
            raise RuntimeError(f"MicroBatcher {self.name!r} is stopping; it takes no new items")
        if self.started:
            if self._loop is not loop:
                raise RuntimeError(
                    f"MicroBatcher {self.name!r} already runs on another event loop; await stop() there first"
                )
            return
        self._loop, self._queue, self._waiting, self._batch = loop, asyncio.Queue(), 0, []
        if self._given_executor is not None:
            self._executor = self._given_executor
        elif self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"mmfusion-{self.name}")
        self._task = loop.create_task(self._collect(), name=f"mmfusion-{self.name}-collector")

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the items already queued, then stop the collector (and the executor the batcher owns).

        Args:
            timeout: seconds to wait for the drain; past it the waiting callers are cancelled. None waits.
        """
        task = self._task
        if task is None:
            return
        if not task.done():
            self._stopping = True
            self._queue.put_nowait(_STOP)
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                log.warning("batcher %s: drain took over %ss; cancelling the callers still waiting", self.name, timeout)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task, self._stopping = None, False
        if self._executor is not None and self._executor is not self._given_executor:
            self._executor.shutdown(wait=False)  # idle: the last batch has returned
        self._executor = None

    async def __aenter__(self) -> MicroBatcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- submitting ---------------------------------------------------------------------------------------

    async def submit(self, item: T) -> R:
        """The model's result for one item, computed in a batch with whatever else is waiting.

        Raises:
            QueueFullError: when ``max_queue`` items are already waiting.
            Exception: what ``fn`` raised for this item's batch; RuntimeError when it returned the wrong count.
        """
        (future,) = self._enqueue([item])
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """The results for several items, in order; they may be spread over several batches.

        All are admitted or none: QueueFullError when they do not all fit (also when there are more than
        ``max_queue`` of them, which never fit). If one batch fails, the items still waiting are withdrawn.
        """
        if not items:
            return []
        futures = self._enqueue(list(items))
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()  # withdraw what has not run yet; a no-op on the finished ones
            raise

    def _enqueue(self, items: list[T]) -> list[asyncio.Future]:
        self.start()
        if self._waiting + len(items) > self.max_queue:
            if len(items) > self.max_queue:
                msg = f"{len(items)} items are more than the queue of {self.max_queue} can ever hold; send fewer"
            else:
                msg = f"{self._waiting} items are waiting (the most is {self.max_queue}); retry shortly"
            raise QueueFullError(f"batcher {self.name!r}: {msg}")
        now = self._loop.time()
        futures = []
        for item in items:
            future = self._loop.create_future()
            self._queue.put_nowait(_Entry(item, future, now))
            futures.append(future)
        self._waiting += len(items)
        return futures

    # ---- the collector ------------------------------------------------------------------------------------

    async def _collect(self) -> None:
        try:
            while True:
                batch, last = await self._next_batch()
                if batch:
                    await self._run(batch)
                self._batch = []
                if last:
                    return
        except asyncio.CancelledError:
            self._cancel_all()
            raise

    async def _next_batch(self) -> tuple[list[_Entry], bool]:
        """The next batch, and whether stop() was reached. Callers cancelled meanwhile are dropped."""
        batch = self._batch = []  # kept on self so that a cancelled collector can cancel its callers
        deadline: float | None = None
        while len(batch) < self.max_batch_size:
            if deadline is None:
                entry = await self._queue.get()  # nothing yet: wait as long as it takes
            elif self._queue.empty():
                timeout = deadline - self._loop.time()
                if timeout <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
            else:
                entry = self._queue.get_nowait()
            if entry is _STOP:
                return batch, True
            self._waiting -= 1
            if entry.future.done():  # the caller went away before its batch began
                continue
            batch.append(entry)
            if deadline is None:
                # counted from when the item arrived: an item that queued behind a running batch waits no more
                deadline = entry.enqueued + self.max_wait_ms / 1000
        return batch, False

    async def _run(self, batch: list[_Entry]) -> None:
        try:
            ok, value, seconds = await self._loop.run_in_executor(self._executor, self._call, [e.item for e in batch])
        except Exception as exc:  # the executor refused the job (shut down from outside)
            ok, value, seconds = False, exc, 0.0
        self._record(len(batch), seconds, ok)
        for i, entry in enumerate(batch):
            if entry.future.done():  # cancelled while its batch ran: the result is dropped
                continue
            if not ok:
                entry.future.set_exception(value)
            elif isinstance(value[i], BaseException):  # this item failed alone; the rest of the batch stands
                entry.future.set_exception(value[i])
            else:
                entry.future.set_result(value[i])

    def _call(self, items: list[T]) -> tuple[bool, Any, float]:
        """Runs in the worker thread: (ok, results or the exception, seconds in fn)."""
        t0 = time.perf_counter()
        try:
            results = self.fn(items)
            if not isinstance(results, list):
                results = list(results)
        except Exception as exc:
            return False, exc, time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if len(results) != len(items):
            err = RuntimeError(
                f"batcher {self.name!r}: the model function returned {len(results)} results for a batch of "
                f"{len(items)} items; it must return exactly one result per item, in order"
            )
            return False, err, seconds
        return True, results, seconds

    def _record(self, size: int, seconds: float, ok: bool) -> None:
        s = self._stats
        s.batches += 1
        s.items += size
        s.batch_size_histogram[size] = s.batch_size_histogram.get(size, 0) + 1
        s.busy_seconds += seconds
        if not ok:
            s.errors += 1
            log.warning("batcher %s: a batch of %d failed", self.name, size)
        if self.on_batch is not None:
            try:
                self.on_batch(size, seconds)
            except Exception:
                log.exception("batcher %s: on_batch failed", self.name)

    def _cancel_all(self) -> None:
        """The collector was cancelled: nobody will answer the waiting callers, so cancel them."""
        for entry in self._batch:
            entry.future.cancel()
        self._batch = []
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not _STOP:
                entry.future.cancel()
        self._waiting = 0

    # ---- statistics ---------------------------------------------------------------------------------------

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters (a copy: later batches do not change it)."""
        s = self._stats
        return BatcherStats(
            batches=s.batches,
            items=s.items,
            queue_depth=self._waiting,
            batch_size_histogram=dict(sorted(s.batch_size_histogram.items())),
            errors=s.errors,
            busy_seconds=s.busy_seconds,
        )
