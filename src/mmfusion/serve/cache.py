"""The text-embedding cache: an LRU in this process (the default) or one Redis that every replica shares.

Both are :class:`EmbeddingCache`: ``get_many`` / ``put_many`` of (D,) float vectors by text. The Redis cache keys
an entry by the model's fingerprint and the text's SHA-256 (``mmfusion:emb:<fingerprint>:<hash>``), so replicas
serving the same weights share entries and a new model never reads an old one's. It is bounded twice: each entry
expires ``ttl_s`` after it was written, and Redis evicts under ``maxmemory`` (``volatile-lru`` evicts only keys
with a TTL, i.e. cache entries, never jobs; a Redis of its own for the cache can use ``allkeys-lru``).

A cache must never turn into an error: when Redis cannot be reached the cache logs once, answers "miss" and
writes nothing for ``retry_s`` seconds, then tries again (and logs when it is back).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class EmbeddingCache(Protocol):
    async def get_many(self, texts: list[str]) -> list[np.ndarray | None]: ...

    async def put_many(self, items: dict[str, np.ndarray]) -> None: ...

    async def close(self) -> None: ...


class LRU:
    """A small least-recently-used cache; size 0 keeps nothing."""

    def __init__(self, size: int):
        self.size, self.data = size, OrderedDict()

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


class LocalCache:
    """The in-process cache: an LRU of ``size`` texts."""

    def __init__(self, size: int):
        self.lru = LRU(size)

    async def get_many(self, texts: list[str]) -> list[np.ndarray | None]:
        return [self.lru.get(t) for t in texts]

    async def put_many(self, items: dict[str, np.ndarray]) -> None:
        for t, v in items.items():
            self.lru.put(t, v)

    async def close(self) -> None:
        pass


class RedisCache:
    """The shared cache on Redis (redis-py's asyncio client). Vectors are stored as float32 bytes."""

    def __init__(self, url: str, fingerprint: str, ttl_s: float = 86400.0, retry_s: float = 5.0, timeout_s=0.5):
        from redis import asyncio as aioredis

        self.prefix = f"mmfusion:emb:{fingerprint}:"
        self.ttl_ms, self.retry_s = max(1, int(ttl_s * 1000)), retry_s
        # short timeouts: a cache that answers slowly is worse than none
        self.r = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.down_until = 0.0  # while Redis is away: no calls before this time
        self.warned = False

    def key(self, text: str) -> str:
        return self.prefix + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def _away(self, e: Exception) -> None:
        self.down_until = time.monotonic() + self.retry_s
        if not self.warned:
            log.warning("the Redis embedding cache is unreachable (%s): serving without it, retrying every %.0f s",
                        e, self.retry_s)  # fmt: skip
            self.warned = True

    def _up(self) -> bool:
        return time.monotonic() >= self.down_until

    async def get_many(self, texts: list[str]) -> list[np.ndarray | None]:
        if not texts or not self._up():
            return [None] * len(texts)
        try:
            raw = await self.r.mget([self.key(t) for t in texts])
        except Exception as e:  # any failure of the cache is a miss, never the request's error
            self._away(e)
            return [None] * len(texts)
        if self.warned:
            log.warning("the Redis embedding cache is back")
            self.warned = False
        return [None if b is None else np.frombuffer(b, dtype=np.float32).copy() for b in raw]

    async def put_many(self, items: dict[str, np.ndarray]) -> None:
        if not items or not self._up():
            return
        try:
            async with self.r.pipeline(transaction=False) as p:
                for t, v in items.items():
                    p.set(self.key(t), np.asarray(v, dtype=np.float32).tobytes(), px=self.ttl_ms)
                await p.execute()
        except Exception as e:
            self._away(e)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a client of a Redis that went away
            await self.r.aclose()
