"""What the routes share: the settings, the models, the index, the batchers, caches and metrics.

:meth:`Service.open` loads and opens all of it (the app's lifespan calls it at start-up) and :meth:`Service.close`
releases it at shutdown. Model calls go through micro-batchers that run off the event loop, and the queries are
encoded by :class:`~mmfusion.index.encoder.QueryEncoder`, as ``mmfusion search`` encodes them, so the service and
the CLI rank alike. Every use of the index runs in one thread of its own (SQLite objects stay in one thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from .batching import MicroBatcher
from .cache import LRU, EmbeddingCache, LocalCache
from .generation import Generators, model_label
from .images import decode_data_url, decode_image_bytes
from .jobs import JobRunner, Jobs, JobStore
from .settings import ServeSettings


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mmfusion_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)  # fmt: skip
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.latency = Histogram("mmfusion_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=buckets)  # fmt: skip
        self.batch = Histogram("mmfusion_batch_size", "items per model call", ["batcher"], registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.batch_seconds = Histogram("mmfusion_batch_seconds", "seconds per model call", ["batcher"],
                                       registry=self.registry)  # fmt: skip
        self.queue = Gauge(
            "mmfusion_queue_depth", "requests waiting for the model", ["batcher"], registry=self.registry
        )
        self.cache = Counter("mmfusion_text_cache", "text embedding cache lookups", ["result"], registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """The service's resources. Build it with :meth:`open` and release it with :meth:`close`."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.embedder = self.index = self.encoder = None
        self.draft_size: int | None = None  # query JPEGs decode at the scale indexing decodes them for the model
        self.metrics = Metrics()
        self.text_cache: EmbeddingCache = LocalCache(settings.text_cache_size)
        self.thumbs = LRU(2048)  # (id, content hash) -> JPEG bytes
        self.index_pool = ThreadPoolExecutor(1, thread_name_prefix="mmfusion-index")  # SQLite stays in one thread
        self.batchers: dict[str, MicroBatcher] = {}
        self.generators = Generators()
        self.job_store: Jobs | None = None  # SQLite, or Redis with redis_url (what the routes call)
        self.jobs = None  # the runner of job items in this process (a JobRunner or a RedisJobRunner), if any
        self.reranker = None  # an index.rerank.SearchReranker when settings.reranker names one
        self.started = time.time()
        self._ids: dict[int, str] = {}  # id(model) -> its name in the API, unique among the served models
        self._threads_before: tuple[int | None, int | None] | None = None  # (ONNX Runtime's, torch's) before

    # ---- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: ServeSettings, embedder=None, captioner=None, answerer=None) -> Service:
        """The service for ``settings``, its models loaded and its index opened, off the event loop.

        Args:
            embedder, captioner, answerer: already-built models; the ones not given are loaded by the names in the
                settings (the embedder defaults to the index's own model).
        """
        svc = cls(settings)
        try:
            await svc._load(embedder, captioner, answerer)
        except BaseException:
            await svc.close()
            raise
        return svc

    async def _load(self, embedder, captioner, answerer) -> None:
        from ..index.encoder import QueryEncoder

        s = self.settings
        if s.threads:  # before any model is loaded, the index's own included; close() puts the old ones back
            from ..backends import ort

            self._threads_before = (ort.DEFAULT_THREADS, None)
            ort.set_default_threads(s.threads)
        if embedder is None:
            embedder = await asyncio.to_thread(_load_model, s.model, s.device)
        if s.index_dir is not None:
            from ..index import Index

            # a given embedder is checked against the index's model: an index never mixes models
            if s.snapshots:  # the published versions, swapped between requests (index/snapshots.py)
                from ..index.snapshots import SnapshotReader

                self.index = await asyncio.to_thread(
                    SnapshotReader.open, s.index_dir, embedder, poll_s=s.snapshot_poll_s,
                    redis_url=getattr(s, "redis_url", None),
                )  # fmt: skip
            else:
                self.index = await self.in_index_thread(
                    lambda: Index.open(s.index_dir, model=embedder, vectors=s.vectors)
                )
            if embedder is None:
                embedder = await self.in_index_thread(lambda: self.index.model)  # the model the index was built with
        if captioner is None:
            captioner = await asyncio.to_thread(_load_model, s.captioner, s.device)
        if answerer is None:
            answerer = await asyncio.to_thread(_load_model, s.answerer, s.device)
        if getattr(s, "reranker", None):
            from ..index.rerank import load_reranker

            self.reranker = await asyncio.to_thread(load_reranker, s.reranker)
        self.generators.close()  # the empty one made in __init__
        if s.threads and "torch" in sys.modules:  # a torch model (an export alone never imports torch)
            import torch

            self._threads_before = (self._threads_before[0], torch.get_num_threads())
            torch.set_num_threads(s.threads)
        self.embedder, self.generators = embedder, Generators(captioner, answerer)
        self._ids = served_ids([(embedder, "embedder"), (captioner, "captioner"), (answerer, "answerer")])
        if embedder is not None:
            self.encoder = QueryEncoder(embedder)
            self.draft_size = self.encoder.size  # the smallest side indexing decodes JPEGs at for this model
            self.batchers["text"] = self._batcher("text", lambda texts: list(self.encoder.encode_texts(texts)))
            self.batchers["image"] = self._batcher("image", lambda images: list(self.encoder.encode_images(images)))
        if self.index is not None:  # searches of concurrent requests share one FAISS call, in the index's thread
            self.batchers["search"] = self._batcher("search", self._search_batch, executor=self.index_pool)
        await self._open_jobs(captioner, answerer)

    async def _open_jobs(self, captioner, answerer) -> None:
        """The job store (Redis with redis_url, else SQLite), the shared text cache, and this process's runner."""
        s = self.settings
        if s.redis_url:
            from .redis_jobs import RedisJobRunner, RedisJobStore

            self.job_store = await asyncio.to_thread(RedisJobStore, s.redis_url, s.job_stale_s, s.job_max_attempts)
            if self.embedder is not None and s.text_cache_size > 0:
                from .cache import RedisCache

                fingerprint = await asyncio.to_thread(_fingerprint, self.embedder)
                self.text_cache = RedisCache(s.redis_url, fingerprint, ttl_s=s.cache_ttl_s)
            if s.worker:
                self.jobs = RedisJobRunner(self, self.job_store, s.job_heartbeat_s)
        else:
            jobs_db = s.jobs_db or (s.index_dir / "jobs.sqlite" if s.index_dir is not None else None)
            if captioner is None and answerer is None:
                jobs_db = None  # no model that generates: no file is written beside the index (embed jobs in memory)
            self.job_store = await asyncio.to_thread(JobStore, jobs_db)
            if s.worker:
                self.jobs = JobRunner(self, self.job_store, s.job_heartbeat_s, s.job_stale_s)
        if self.jobs is not None:
            self.jobs.start()

    async def close(self) -> None:
        """Stop the job runner and the batchers, then close the job store, the index and the threads."""
        if self._threads_before is not None:
            from ..backends import ort

            ort.set_default_threads(self._threads_before[0])
            if self._threads_before[1] is not None:
                import torch

                torch.set_num_threads(self._threads_before[1])
            self._threads_before = None
        if self.jobs is not None:
            await self.jobs.stop()
        for b in self.batchers.values():
            await b.stop()
        self.generators.close()
        if self.job_store is not None:
            self.job_store.close()
        await self.text_cache.close()
        if self.index is not None:
            await self.in_index_thread(self.index.close)
        self.index_pool.shutdown(wait=True)

    def _batcher(self, name: str, fn, executor: ThreadPoolExecutor | None = None) -> MicroBatcher:
        s = self.settings

        def on_batch(size: int, seconds: float) -> None:
            self.metrics.batch.labels(name).observe(size)
            self.metrics.batch_seconds.labels(name).observe(seconds)

        return MicroBatcher(fn, s.max_batch_size, s.max_wait_ms, s.max_queue, name=name, on_batch=on_batch,
                            executor=executor)  # fmt: skip

    # ---- what the routes call -----------------------------------------------------------------------------

    @property
    def embedder_id(self) -> str:
        """The embedder's id in /v1/models and /healthz."""
        return self._ids.get(id(self.embedder)) or getattr(self.embedder, "name", None) or "mmfusion"

    def model_name(self, model) -> str | None:
        """A served model's id in /v1/models, /healthz and the chat route's ``model`` field."""
        if model is None:
            return None
        return self._ids.get(id(model)) or model_label(model)

    async def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        """(D,) embeddings of texts, through the LRU cache and the text batcher."""
        out: list[np.ndarray | None] = await self.text_cache.get_many(texts)
        todo = [i for i, v in enumerate(out) if v is None]
        self.metrics.cache.labels("hit").inc(len(texts) - len(todo))
        self.metrics.cache.labels("miss").inc(len(todo))
        if todo:
            vecs = await self._submit("text", [texts[i] for i in todo])
            for i, v in zip(todo, vecs, strict=True):
                out[i] = v
            await self.text_cache.put_many({texts[i]: out[i] for i in todo})
        return out  # type: ignore[return-value]

    async def decode(self, images: list[str | bytes]) -> list[Image.Image]:
        """Data URLs or image bytes to RGB images, decoded off the event loop (a large image takes a while) at
        the scale indexing decodes for the model; 400/422 for one that is not a usable image."""
        s = self.settings

        def one(x: str | bytes) -> Image.Image:
            if isinstance(x, bytes):
                return decode_image_bytes(x, s.max_pixels, self.draft_size)
            return decode_data_url(x, s.max_pixels, self.draft_size)

        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(None, one, x) for x in images)))

    async def embed_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        """(D,) embeddings of images, through the image batcher."""
        return await self._submit("image", images)

    async def search(self, terms: list, options: dict[str, Any]) -> list:
        """The results of one search, batched with the searches of concurrent requests."""
        return await self.batchers["search"].submit((terms, options))

    async def _submit(self, name: str, items: list) -> list:
        """Items through a batcher, in slices the queue can hold (a large request never blocks the queue)."""
        step = max(1, min(self.settings.max_queue // 2, 256))
        out: list = []
        for i in range(0, len(items), step):
            out += await self.batchers[name].submit_many(items[i : i + step])
        return out

    async def in_index_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.index_pool, fn, *args)

    def _search_batch(self, items: list[tuple[list, dict]]) -> list:
        """Runs in the index thread: the query vector of each (terms, options) item, then one
        :meth:`~mmfusion.index.Index.search_many` for all. An item whose terms fail (an id not in the index,
        terms that cancel out) gets its exception as its result, which the batcher raises for that item alone."""
        from ..index import VectorQuery
        from ..index.query import combine_terms

        out: list = [None] * len(items)
        queries: list[tuple[int, VectorQuery]] = []
        lease = getattr(self.index, "lease", None)  # snapshots: the whole batch on one version
        with lease() if lease is not None else contextlib.nullcontext(self.index) as index:
            for i, (terms, options) in enumerate(items):
                try:
                    queries.append((i, VectorQuery(combine_terms(terms, index), **options)))
                except (KeyError, ValueError) as e:
                    out[i] = e
            for (i, _), results in zip(queries, index.search_many([q for _, q in queries]), strict=True):
                out[i] = results
        return out


def served_ids(models: list[tuple[Any, str]]) -> dict[int, str]:
    """Names for the served models (``(model, role)`` pairs) that tell them apart: each its own name, unless two
    different models share one (a captioner and the same preset fine-tuned for VQA are both ``caption-tiny``):
    those get their role after it (``caption-tiny:captioner``, ``caption-tiny:answerer``), so /v1/models, /healthz
    and a request's ``model`` tell them apart. One model in two roles keeps one name. The models are not changed."""
    names = {id(m): model_label(m) for m, _ in models if m is not None}
    out = {}
    for model, role in models:
        if model is None or id(model) in out:
            continue
        name = names[id(model)]
        out[id(model)] = f"{name}:{role}" if sum(n == name for n in names.values()) > 1 else name
    return out


def _fingerprint(model) -> str:
    """What keys the shared cache's entries: the weights' fingerprint (the name, for a model without one and no
    torch to hash it with)."""
    from ..backends import model_fingerprint

    try:
        return model_fingerprint(model)
    except ImportError:
        return str(getattr(model, "name", type(model).__name__))


def _load_model(name: str | None, device: str | None):
    """The model named in the settings (None: none is asked for)."""
    if not name:
        return None
    from ..backends import load

    return load(name, device=device)
