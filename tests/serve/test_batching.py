"""MicroBatcher: coalescing, max_wait, no-batching mode, errors, backpressure, cancellation, drain, stats.

Timing bounds are loose on purpose: the machine is shared and noisy.
"""

import asyncio
import concurrent.futures
import threading
import time

import pytest

from mmfusion.index.encoder import split_by_length
from mmfusion.serve.batching import MicroBatcher, QueueFullError


class Recorder:
    """A model function that doubles its inputs, sleeps ``delay`` seconds per call and records each batch."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.delay, self.gate = delay, gate
        self.calls: list[list] = []
        self.threads: set[int] = set()
        self.entered = threading.Event()

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        self.threads.add(threading.get_ident())
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        time.sleep(self.delay)
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 2 for x in items]


async def wait_entered(fn: Recorder) -> None:
    """Until ``fn`` is running (its batch has started)."""
    assert await asyncio.to_thread(fn.entered.wait, 5)


def test_concurrent_submits_coalesce_into_batches():
    fn = Recorder(delay=0.05)

    async def main():
        async with MicroBatcher(fn, max_batch_size=16, max_wait_ms=20) as b:
            return await asyncio.gather(*(b.submit(i) for i in range(64)))

    assert asyncio.run(main()) == [2 * i for i in range(64)]
    assert sum(len(c) for c in fn.calls) == 64
    assert all(len(c) <= 16 for c in fn.calls)
    assert len(fn.calls) <= 8  # 4 when the machine is quiet
    assert len(fn.threads) == 1 and threading.get_ident() not in fn.threads  # one worker thread, off the loop


def test_submit_many_keeps_order_across_batches():
    fn = Recorder(delay=0.01)

    async def main():
        async with MicroBatcher(fn, max_batch_size=3, max_wait_ms=5) as b:
            return await asyncio.gather(b.submit_many(list(range(10))), b.submit_many([100, 101]), b.submit_many([]))

    assert asyncio.run(main()) == [[2 * i for i in range(10)], [200, 202], []]
    assert all(len(c) <= 3 for c in fn.calls)


def test_max_wait_is_honoured():
    fn = Recorder()

    async def main():
        async with MicroBatcher(fn, max_batch_size=8, max_wait_ms=100) as b:
            t0 = time.perf_counter()
            assert await b.submit(1) == 2  # alone: waits about max_wait for company, then runs
            alone = time.perf_counter() - t0
        async with MicroBatcher(fn, max_batch_size=4, max_wait_ms=10_000) as b:
            t0 = time.perf_counter()
            assert await b.submit_many([1, 2, 3, 4]) == [2, 4, 6, 8]  # a full batch does not wait
            full = time.perf_counter() - t0
        return alone, full

    alone, full = asyncio.run(main())
    assert 0.08 <= alone < 3.0
    assert full < 3.0


def test_max_batch_size_one_is_no_batching():
    fn = Recorder(delay=0.005)

    async def main():
        async with MicroBatcher(fn, max_batch_size=1, max_wait_ms=50) as b:
            return await asyncio.gather(*(b.submit(i) for i in range(10))), b.stats

    results, stats = asyncio.run(main())
    assert results == [2 * i for i in range(10)]
    assert fn.calls == [[i] for i in range(10)]
    assert stats.batches == 10 and stats.batch_size_histogram == {1: 10}


def test_exception_reaches_exactly_the_callers_of_its_batch():
    fn = Recorder(delay=0.02)
    items = [0, 1, "bad", 3, 4, 5, 6, 7, 8, 9, 10, 11]

    async def main():
        async with MicroBatcher(fn, max_batch_size=4, max_wait_ms=10) as b:
            out = await asyncio.gather(*(b.submit(x) for x in items), return_exceptions=True)
            return out, await b.submit(21), b.stats

    out, after, stats = asyncio.run(main())
    failed = {x for call in fn.calls if "bad" in call for x in call}
    assert failed and len(failed) <= 4
    for x, r in zip(items, out):
        if x in failed:
            assert isinstance(r, ValueError)
        else:
            assert r == 2 * x
    assert after == 42  # the batcher keeps working
    assert stats.errors == 1


def test_an_exception_returned_for_one_item_fails_that_item_only():
    def fn(items):
        return [KeyError(x) if x < 0 else 2 * x for x in items]

    async def main():
        async with MicroBatcher(fn, max_batch_size=8, max_wait_ms=20) as b:
            return await asyncio.gather(*(b.submit(x) for x in [1, -2, 3]), return_exceptions=True), b.stats

    (one, bad, three), stats = asyncio.run(main())
    assert (one, three) == (2, 6) and isinstance(bad, KeyError) and bad.args == (-2,)
    assert stats.errors == 0 and stats.batches == 1  # the batch itself succeeded


def test_wrong_result_count_is_a_runtime_error():
    async def main():
        async with MicroBatcher(lambda xs: xs[:-1], max_batch_size=4, max_wait_ms=20) as b:
            return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "2 results for a batch of 3" in str(r) for r in out)


def test_queue_full_raises_at_once():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        async with MicroBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue=4) as b:
            running = asyncio.create_task(b.submit(0))
            await wait_entered(fn)  # item 0 is inside fn: it no longer counts as waiting
            queued = [asyncio.create_task(b.submit(i)) for i in range(1, 5)]
            await asyncio.sleep(0.01)
            assert b.stats.queue_depth == 4
            with pytest.raises(QueueFullError, match="4 items are waiting"):
                await b.submit(5)
            with pytest.raises(QueueFullError, match="can ever hold"):
                await b.submit_many(list(range(5)))
            gate.set()
            out = await asyncio.gather(running, *queued)
            assert await b.submit(5) == 10  # room again
            assert b.stats.queue_depth == 0
            return out

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]


def test_cancelled_callers_do_not_break_the_others():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        async with MicroBatcher(fn, max_batch_size=8, max_wait_ms=0) as b:
            running = asyncio.create_task(b.submit(0))
            await wait_entered(fn)
            queued = {i: asyncio.create_task(b.submit(i)) for i in (1, 2, 3)}
            await asyncio.sleep(0.01)
            queued[2].cancel()  # its batch has not started: dropped from it
            running.cancel()  # its batch runs: the result is thrown away
            gate.set()
            out = await asyncio.gather(queued[1], queued[3])
            assert queued[2].cancelled() and running.cancelled()
            return out

    assert asyncio.run(main()) == [2, 6]
    assert fn.calls == [[0], [1, 3]]


def test_stop_drains_the_queue():
    fn = Recorder(delay=0.02)

    async def main():
        b = MicroBatcher(fn, max_batch_size=4, max_wait_ms=10_000)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(10)]
        await asyncio.sleep(0.01)  # all queued; the first batch gathers and would wait 10 s for a fourth item...
        t0 = time.perf_counter()
        await b.stop()  # ...but stop flushes it at once
        assert time.perf_counter() - t0 < 5.0
        assert all(t.done() for t in tasks)
        assert not b.started
        again = asyncio.create_task(b.submit(50))  # starts again lazily
        await asyncio.sleep(0.01)
        await b.stop()
        return [t.result() for t in tasks], again.result()

    results, again = asyncio.run(main())
    assert results == [2 * i for i in range(10)] and again == 100
    assert sum(len(c) for c in fn.calls) == 11


def test_stop_refuses_new_items_while_draining():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0)
        first = asyncio.create_task(b.submit(1))
        await wait_entered(fn)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="stopping"):
            await b.submit(2)
        gate.set()
        await stopping
        return await first

    assert asyncio.run(main()) == 2


def test_event_loop_stays_responsive_while_fn_runs():
    fn = Recorder(delay=0.2)

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        async with MicroBatcher(fn, max_batch_size=4, max_wait_ms=1) as b:
            assert await b.submit(3) == 6
        done.set()
        await t
        return ticks

    assert asyncio.run(main()) >= 5  # about 20 when quiet; 0 if fn blocked the loop


def test_stats_and_on_batch_report_sizes():
    seen: list[tuple[int, float]] = []
    fn = Recorder(delay=0.02)

    async def main():
        async with MicroBatcher(fn, max_batch_size=4, max_wait_ms=10, on_batch=lambda n, s: seen.append((n, s))) as b:
            await asyncio.gather(*(b.submit(i) for i in range(10)))
            with pytest.raises(ValueError):
                await b.submit("bad")
            return b.stats

    stats = asyncio.run(main())
    sizes = [n for n, _ in seen]
    assert sizes == [len(c) for c in fn.calls] and sum(sizes) == 11
    assert stats.batches == len(seen) and stats.items == 11 and stats.errors == 1 and stats.queue_depth == 0
    assert stats.batch_size_histogram == {n: sizes.count(n) for n in set(sizes)}
    assert all(s >= 0.015 for _, s in seen)
    assert stats.busy_seconds == pytest.approx(sum(s for _, s in seen))


def test_a_given_executor_is_used_and_left_open():
    fn = Recorder()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mine") as pool:

        async def main():
            async with MicroBatcher(fn, executor=pool, max_wait_ms=0) as b:
                return await b.submit(2)

        assert asyncio.run(main()) == 4
        assert pool.submit(lambda: threading.current_thread().name).result().startswith("mine")
        assert fn.threads == {pool.submit(threading.get_ident).result()}


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_queue": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MicroBatcher(lambda xs: xs, **kwargs)


def test_start_needs_a_running_loop():
    with pytest.raises(RuntimeError, match="running event loop"):
        MicroBatcher(lambda xs: xs).start()


# ---- split_by_length ----------------------------------------------------------------------------------------


def _cost(groups, lengths, min_rows):
    return sum(max(len(g) * max(lengths[i] for i in g), min_rows) for g in groups)


def _best_cost(lengths, min_rows):
    """Brute force: every split of the sorted distinct lengths into runs."""
    distinct = sorted(set(lengths))
    best = float("inf")
    for mask in range(2 ** (len(distinct) - 1)):
        runs, run = [], [distinct[0]]
        for k, n in enumerate(distinct[1:]):
            if mask >> k & 1:
                runs.append(run)
                run = []
            run.append(n)
        runs.append(run)
        groups = [[i for i, n in enumerate(lengths) if n in r] for r in runs]
        best = min(best, _cost(groups, lengths, min_rows))
    return best


def test_split_by_length_edges():
    assert split_by_length([]) == []
    assert split_by_length([7]) == [[0]]
    assert split_by_length([5, 5, 5], min_rows=0) == [[0, 1, 2]]
    lengths = [21, 12, 17, 12, 21, 17]
    assert split_by_length(lengths, min_rows=0) == [[1, 3], [2, 5], [0, 4]]  # a group per length, shortest first
    assert split_by_length(lengths, min_rows=10**9) == [list(range(6))]  # calls too dear to split


def test_split_by_length_is_optimal_and_covers_every_index():
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(3, 30) for _ in range(rng.randint(1, 40))]
        min_rows = rng.choice([0, 16, 64, 128, 400])
        groups = split_by_length(lengths, min_rows)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(g == sorted(g) and g for g in groups)
        longest = [max(lengths[i] for i in g) for g in groups]
        assert longest == sorted(longest)  # runs of the sorted lengths, shortest first
        assert all(lengths[i] > (longest[k - 1] if k else 0) for k, g in enumerate(groups) for i in g)
        if len(set(lengths)) <= 12:
            assert _cost(groups, lengths, min_rows) == _best_cost(lengths, min_rows)


def test_split_by_length_ties_prefer_fewer_calls():
    # one group: 4 * 10 = 40 rows; two: max(2 * 5, 20) + max(2 * 10, 20) = 40 as well
    assert split_by_length([5, 5, 10, 10], min_rows=20) == [[0, 1, 2, 3]]


def test_service_text_batches_split_by_length_give_the_embeddings_of_one_call(tmp_path):
    """The service's text batcher calls QueryEncoder.encode_texts, which splits a batch by length on CPU."""
    import numpy as np
    import torch

    import mmfusion
    from mmfusion.index.encoder import QueryEncoder
    from tests.utils import tiny_clip

    model = mmfusion.load(str(tiny_clip(tmp_path / "clip")), device="cpu")
    texts = ["a red circle", "a blue square and a green star", "a cyan star", "a white cross, a blue square and"
             " a green star", "a red circle", "a yellow triangle and a purple star"]  # fmt: skip
    encoder = QueryEncoder(model)
    encoder.text_call_min_rows = 0  # a group per length: these texts are too short to split at the default
    with torch.inference_mode():
        expected = model.encode_text(texts).numpy()
    got = np.stack(encoder.encode_texts(texts))
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
    lengths = (model.tokenize(texts) != 0).sum(-1).tolist()
    assert len(set(lengths)) > 2 and len(split_by_length(lengths, 0)) > 1  # the test does split
