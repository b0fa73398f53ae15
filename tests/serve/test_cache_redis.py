"""The text-embedding cache on Redis: shared by replicas, keyed by the model, bounded, and never an error."""

import asyncio
import logging
import time

import numpy as np
import pytest

pytest.importorskip("redis")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.cache import LocalCache, RedisCache  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: E402, F401 (fixtures)
from tests.serve.conftest import LOCAL  # noqa: E402
from tests.utils import tiny_clip  # noqa: E402

TEXTS = ["a red circle", "two green squares", "a blue star"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _counts(client) -> dict[str, float]:
    """The service's cache lookups and text-model calls, from /metrics."""
    out = {"hit": 0.0, "miss": 0.0, "calls": 0.0}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('mmfusion_text_cache_total{result="hit"}'):
            out["hit"] = float(line.split()[-1])
        elif line.startswith('mmfusion_text_cache_total{result="miss"}'):
            out["miss"] = float(line.split()[-1])
        elif line.startswith('mmfusion_batch_size_count{batcher="text"}'):
            out["calls"] = float(line.split()[-1])
    return out


def _embed(client, texts) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_cache_contract_round_trips_vectors_exactly(kind, redis_url):  # noqa: F811
    vecs = {t: np.random.default_rng(i).standard_normal(16).astype(np.float32) for i, t in enumerate(TEXTS)}

    async def go():
        cache = LocalCache(8) if kind == "local" else RedisCache(redis_url, f"test-{time.time_ns()}", ttl_s=60)
        assert await cache.get_many(TEXTS) == [None] * 3
        await cache.put_many(vecs)
        got = await cache.get_many([*TEXTS, "unseen"])
        await cache.close()
        return got

    got = asyncio.run(go())
    assert got[3] is None and all(np.array_equal(g, vecs[t]) for g, t in zip(got, TEXTS, strict=False))


def test_entries_expire_and_models_do_not_share_them(redis_url):  # noqa: F811
    async def go():
        a, b = RedisCache(redis_url, "model-a", ttl_s=0.2), RedisCache(redis_url, "model-b", ttl_s=60)
        await a.put_many({"x": np.ones(4, np.float32)})
        seen = (await a.get_many(["x"]))[0] is not None, (await b.get_many(["x"]))[0] is None
        ttl = await a.r.pttl(a.key("x"))
        await asyncio.sleep(0.3)
        gone = (await a.get_many(["x"]))[0] is None
        await a.close(), await b.close()
        return seen, ttl, gone

    seen, ttl, gone = asyncio.run(go())
    assert seen == (True, True) and 0 < ttl <= 200 and gone


def test_an_embedding_computed_on_replica_a_is_a_cache_hit_on_replica_b(clip, redis_url):  # noqa: F811
    settings = ServeSettings(model=str(clip), redis_url=redis_url, worker=False)
    with TestClient(create_app(settings), base_url=LOCAL) as a, TestClient(create_app(settings), base_url=LOCAL) as b:
        texts = [f"{t} {time.time_ns()}" for t in TEXTS]  # new to this Redis
        on_a = _embed(a, texts)
        before = _counts(b)
        on_b = _embed(b, texts)
        after = _counts(b)
        assert after["hit"] - before["hit"] == 3 and after["miss"] == before["miss"]
        assert after["calls"] == before["calls"]  # replica B never ran its model for them
        np.testing.assert_array_equal(on_a, on_b)
    with TestClient(create_app(ServeSettings(model=str(clip)), embedder=None), base_url=LOCAL) as alone:
        np.testing.assert_allclose(_embed(alone, texts), on_a, atol=1e-6)  # the same vectors as without Redis


def test_redis_down_degrades_to_no_cache_never_to_errors(clip, tmp_path, caplog):
    server = RedisServer(tmp_path / "redis").start()
    settings = ServeSettings(model=str(clip), redis_url=server.url, worker=False)
    try:
        with TestClient(create_app(settings), base_url=LOCAL) as client:
            first = _embed(client, TEXTS)
            server.kill()
            with caplog.at_level(logging.WARNING, logger="mmfusion.serve.cache"):
                for _ in range(3):
                    np.testing.assert_allclose(_embed(client, TEXTS), first, atol=1e-6)
            warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(warnings) == 1  # logged once, not per request
            assert client.get("/healthz").status_code == 200
            server.start()  # Redis is back: after the retry wait the cache is read and written again
            client.app.state.service.text_cache.down_until = 0  # skip the retry wait
            _embed(client, TEXTS)
            assert all(v is not None for v in asyncio.run(_lookup(server.url, client, TEXTS)))
    finally:
        server.stop()


async def _lookup(url: str, client, texts):
    svc = client.app.state.service
    cache = RedisCache(url, svc.text_cache.prefix.split(":")[2])
    try:
        return await cache.get_many(texts)
    finally:
        await cache.close()
