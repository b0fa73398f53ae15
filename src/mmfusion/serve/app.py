"""The HTTP service: OpenAI-compatible embeddings, image search, zero-shot labels, health and metrics.

Build it with :func:`create_app` (``mmfusion serve`` does). Model calls go through micro-batchers that run
off the event loop; index reads run in one thread of their own (SQLite connections stay in one thread).
Images come in as data URLs or uploads, never as paths or URLs to fetch, and files go out by id only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import ImageDecodeError
from .batching import MicroBatcher, QueueFullError
from .chat import add_chat_routes
from .generation import Generators
from .images import decode_data_url
from .jobs import JobRunner, JobStore, add_job_routes
from .limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from .settings import ServeSettings

log = logging.getLogger(__name__)
MAX_K = 1000


# ---- request and response bodies ----------------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus ``modality``: images are sent as data URLs (``data:image/png;base64,...``)."""

    input: str | list[str] = Field(description="a text or a list of texts (or of image data URLs)")
    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    modality: Literal["text", "image"] = Field("text", description="what the inputs are")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, description="not supported: the model's own width is returned")


class SearchTerm(BaseModel):
    weight: float = 1.0
    text: str | None = None
    image: str | None = Field(None, description="an image as a data URL")
    id: int | None = Field(None, description="an indexed image's id: more like it")


class SearchRequest(BaseModel):
    """Search the index by a text, an image, an indexed image, or a weighted sum of them."""

    text: str | None = None
    image: str | None = Field(None, description="an image as a data URL")
    id: int | None = Field(None, description="an indexed image's id")
    terms: list[SearchTerm] = Field(default_factory=list, description="weighted terms, added to the above")
    k: int = Field(20, ge=1, le=MAX_K)
    threshold: float | None = Field(None, description="drop results with a lower cosine similarity")
    path: str | None = Field(None, description="only files whose path matches this glob or contains this text")
    after: float | None = Field(None, description="only images taken (or modified) after this unix time")
    before: float | None = None


class ClassifyRequest(BaseModel):
    labels: list[str] = Field(min_length=1, max_length=2000)
    image: str | None = Field(None, description="an image as a data URL")
    id: int | None = Field(None, description="or an indexed image's id")
    templates: list[str] | None = Field(None, description="prompt templates with {} (default: 16 photo prompts)")
    k: int = Field(5, ge=1, le=2000)
    threshold: float | None = Field(None, description="return every label scoring at least this instead of top k")


# ---- helpers ---------------------------------------------------------------------------------------------


class LRU:
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


# ---- the app ----------------------------------------------------------------------------------------------


class Service:
    """What the routes share: settings, the model, the index, batchers, caches, metrics."""

    def __init__(self, settings: ServeSettings, embedder, index, index_pool: ThreadPoolExecutor):
        self.settings, self.embedder, self.index = settings, embedder, index
        self.metrics = Metrics()
        self.text_cache = LRU(settings.text_cache_size)
        self.index_pool = index_pool  # every use of the index runs here: SQLite objects stay in one thread
        self.batchers: dict[str, MicroBatcher] = {}
        self.generators = Generators()
        self.jobs: JobRunner | None = None
        self.started = time.time()
        if embedder is not None:
            self.batchers["text"] = self._batcher("text", self._encode_texts)
            self.batchers["image"] = self._batcher("image", self._encode_images)
        if index is not None:  # searches of concurrent requests share one FAISS call, in the index's thread
            self.batchers["search"] = self._batcher("search", self._search_batch, executor=index_pool)

    def _batcher(self, name: str, fn, executor: ThreadPoolExecutor | None = None) -> MicroBatcher:
        s = self.settings

        def on_batch(size: int, seconds: float) -> None:
            self.metrics.batch.labels(name).observe(size)
            self.metrics.batch_seconds.labels(name).observe(seconds)

        return MicroBatcher(fn, s.max_batch_size, s.max_wait_ms, s.max_queue, name=name, on_batch=on_batch,
                            executor=executor)  # fmt: skip

    def _search_batch(self, items: list[tuple[list, dict]]) -> list:
        """Runs in the index thread: the query vector of each (terms, options) item, then one
        :meth:`~mmfusion.index.Index.search_many` for all. An item whose terms fail (an id not in the index,
        terms that cancel out) gets its exception as its result, which the batcher raises for that item alone."""
        from ..index.collection import VectorQuery
        from ..index.query import combine_terms

        out: list = [None] * len(items)
        queries: list[tuple[int, VectorQuery]] = []
        for i, (terms, options) in enumerate(items):
            try:
                queries.append((i, VectorQuery(combine_terms(terms, self.index), **options)))
            except (KeyError, ValueError) as e:
                out[i] = e
        for (i, _), results in zip(queries, self.index.search_many([q for _, q in queries]), strict=True):
            out[i] = results
        return out

    text_call_min_rows = 128  # a CPU call of a text tower costs at least as much as this many token positions

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """One batch of texts through the model. A native model pads a call to its longest text, and texts in a
        batch differ in length, so on CPU the batch is tokenized at once and run in groups of similar length
        (``split_by_length``): 20-25% fewer rows in the benchmark's batches. An adapter that tokenizes inside
        (HF pads to a fixed length for some models), or a GPU, where small calls cost as much as large ones,
        gets the batch in one call."""
        import torch

        from ..data.tokenizer import PAD_ID
        from .batching import split_by_length

        tokenize = getattr(self.embedder, "tokenize", None)
        device = getattr(self.embedder, "device", None)
        with torch.inference_mode():
            if tokenize is None or len(texts) < 2 or getattr(device, "type", "cpu") != "cpu":
                return list(self.embedder.encode_text(texts).float().cpu().numpy())
            tokens = tokenize(texts)  # (B, L): <pad> after each text's <eot>
            out = np.empty((len(texts), self.embedder.embed_dim), dtype=np.float32)
            for group in split_by_length((tokens != PAD_ID).sum(-1).tolist(), self.text_call_min_rows):
                out[group] = self.embedder.encode_text(tokens[group]).float().cpu().numpy()
            return list(out)

    def _encode_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return list(self.embedder.encode_image(images).float().cpu().numpy())

    async def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [self.text_cache.get(t) for t in texts]
        todo = [i for i, v in enumerate(out) if v is None]
        self.metrics.cache.labels("hit").inc(len(texts) - len(todo))
        self.metrics.cache.labels("miss").inc(len(todo))
        if todo:
            vecs = await self._submit("text", [texts[i] for i in todo])
            for i, v in zip(todo, vecs, strict=True):
                out[i] = v
                self.text_cache.put(texts[i], v)
        return out  # type: ignore[return-value]

    async def embed_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        return await self._submit("image", images)

    async def _submit(self, name: str, items: list) -> list:
        """Items through a batcher, in slices the queue can hold (a large request never blocks the queue)."""
        step = max(1, min(self.settings.max_queue // 2, 256))
        out: list = []
        for i in range(0, len(items), step):
            out += await self.batchers[name].submit_many(items[i : i + step])
        return out

    async def in_index_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.index_pool, fn, *args)

    def model_name(self, model) -> str | None:
        return None if model is None else (getattr(model, "name", None) or type(model).__name__)

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.generators.close()
        if self.jobs is not None:
            self.jobs.store.close()
        if self.index is not None:
            self.index_pool.submit(self.index.close).result()
        self.index_pool.shutdown(wait=True)


def create_app(settings: ServeSettings | None = None, embedder=None, captioner=None, answerer=None) -> FastAPI:
    """The FastAPI app for ``settings``. ``embedder``, ``captioner`` and ``answerer`` may be given as objects;
    otherwise they are loaded by the names in the settings (the embedder defaults to the index's model)."""
    settings = settings or ServeSettings()
    index_pool = ThreadPoolExecutor(1, thread_name_prefix="mmfusion-index")  # SQLite objects stay in one thread
    index = None
    if settings.index_dir is not None:
        from ..index import Index

        index = index_pool.submit(Index.open, settings.index_dir).result()
    if embedder is None and settings.model:
        import mmfusion

        embedder = mmfusion.load(settings.model, device=settings.device)
    if index is not None:
        if embedder is None:
            embedder = index_pool.submit(lambda: index.model).result()  # the model the index was built with
        else:
            index._model = embedder  # checked against the index's model when it is used
    if captioner is None and settings.captioner:
        import mmfusion

        captioner = mmfusion.load(settings.captioner, device=settings.device)
    if answerer is None and settings.answerer:
        import mmfusion

        answerer = mmfusion.load(settings.answerer, device=settings.device)
    svc = Service(settings, embedder, index, index_pool)
    svc.generators = Generators(captioner, answerer)
    jobs_db = settings.jobs_db or (settings.index_dir / "jobs.sqlite" if settings.index_dir is not None else None)
    if captioner is None and answerer is None:
        jobs_db = None  # nothing can run a job: no file is written beside the index
    svc.jobs = JobRunner(svc, JobStore(jobs_db), settings.job_heartbeat_s, settings.job_stale_s)

    async def lifespan(app: FastAPI):
        svc.jobs.start()
        yield
        await svc.jobs.stop()
        await svc.close()

    app = FastAPI(
        title="mmfusion",
        version=_version(),
        description="Multimodal embeddings (OpenAI-compatible), image search and zero-shot labels.",
        lifespan=lifespan,
    )
    app.state.service = svc
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_concurrency, exempt=("/healthz", "/metrics"))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/static/"):  # the page's files: revalidate, so an upgrade shows at once
            response.headers["Cache-Control"] = "no-cache"
        route = getattr(request.scope.get("route"), "path", "other")
        svc.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        svc.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return JSONResponse({"error": {"message": "the model's queue is full; retry shortly", "type": "overloaded"}},
                            status_code=503, headers={"Retry-After": "1"})  # fmt: skip

    @app.exception_handler(StarletteHTTPException)  # ours, and the router's own (404 for unknown routes, 405)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # OpenAI clients read {"error": {"message": ...}}
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error"}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": {"message": f"invalid request: {problems}", "type": "invalid_request_error",
                                       "details": jsonable_encoder(exc.errors())}}, status_code=422)  # fmt: skip

    def authorized(request: Request) -> str | None:
        """The caller's API key (None when the service has no keys); 401 without a valid one."""
        if not settings.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if key not in settings.api_keys:
            raise HTTPException(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return key

    def need_embedder():
        if svc.embedder is None:
            raise HTTPException(503, "no model is loaded: start the service with --model or --db")
        return svc.embedder

    def need_index():
        if svc.index is None:
            raise HTTPException(404, "no index is served: start the service with --db DIR")
        return svc.index

    model_id = getattr(svc.embedder, "name", None) or "mmfusion"

    static = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        """The web page: search, search by example, more like this, ask, caption, labels."""
        index_html = static / "index.html"
        if not index_html.is_file():
            raise HTTPException(404, "the web page is not installed")
        return FileResponse(index_html, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness and what is loaded."""
        images = await svc.in_index_thread(svc.index.store.count) if svc.index is not None else None
        return {"status": "ok", "model": model_id if svc.embedder is not None else None, "images": images,
                "captioner": svc.model_name(svc.generators.captioner),
                "answerer": svc.model_name(svc.generators.answerer), "labels": settings.labels,
                "auth": bool(settings.api_keys), "uptime_s": round(time.time() - svc.started, 1)}  # fmt: skip

    @app.get("/metrics", tags=["service"])
    async def metrics() -> Response:
        """Prometheus metrics: requests, latencies, batch sizes, queue depth, cache hits."""
        for name, b in svc.batchers.items():
            svc.metrics.queue.labels(name).set(b.stats.queue_depth)
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", tags=["openai"])
    async def models(_=Depends(authorized)) -> dict[str, Any]:
        roles = (("embedder", svc.embedder), ("captioner", svc.generators.captioner),
                 ("answerer", svc.generators.answerer))  # fmt: skip
        data = [{"id": svc.model_name(m), "object": "model", "created": int(svc.started), "owned_by": "mmfusion",
                 "role": role} for role, m in roles if m is not None]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(req: EmbeddingRequest, _=Depends(authorized)) -> dict[str, Any]:
        """Embeddings of texts, or of images sent as data URLs with ``"modality": "image"``."""
        need_embedder()
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs:
            raise HTTPException(400, "input is empty: give a text or a list of texts")
        if len(inputs) > settings.max_inputs:
            raise HTTPException(413, f"{len(inputs)} inputs in one request; the limit is {settings.max_inputs}")
        if req.model and req.model != model_id:
            raise HTTPException(404, f"model {req.model!r} is not served here; this service runs {model_id!r}")
        if req.dimensions is not None and req.dimensions != svc.embedder.embed_dim:
            raise HTTPException(400, f"dimensions: this model gives {svc.embedder.embed_dim}-d embeddings only")
        if req.modality == "image":
            images = [decode_data_url(x, settings.max_pixels) for x in inputs]
            vecs = await svc.embed_images(images)
            tokens = 0
        else:
            vecs = await svc.embed_texts(inputs)
            tokens = sum(len(t.split()) for t in inputs)
        data = []
        for i, v in enumerate(vecs):
            emb: Any = (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                        if req.encoding_format == "base64" else np.asarray(v, dtype=np.float32).tolist())  # fmt: skip
            data.append({"object": "embedding", "index": i, "embedding": emb})
        # rendered as it is: FastAPI's validation of the returned dict would walk every float again (50 us a vector)
        return JSONResponse({"object": "list", "data": data, "model": model_id,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip

    async def _terms(req: SearchRequest) -> list:
        from ..index.query import Term

        items = list(req.terms)
        if req.text or req.image or req.id is not None:
            items.insert(0, SearchTerm(weight=1.0, text=req.text, image=req.image, id=req.id))
        terms = []
        for t in items:
            given = [x for x in (t.text, t.image, t.id) if x is not None and x != ""]
            if len(given) > 1 and t is not items[0]:
                raise HTTPException(400, "each search term is one of text, image or id")
            if t.text:
                terms.append(Term(t.weight, "vector", (await svc.embed_texts([t.text]))[0]))
            if t.image:
                img = decode_data_url(t.image, settings.max_pixels)
                terms.append(Term(t.weight, "vector", (await svc.embed_images([img]))[0]))
            if t.id is not None:
                terms.append(Term(t.weight, "id", int(t.id)))
        if not terms:
            raise HTTPException(400, "nothing to search for: give text, image (a data URL), id, or terms")
        return terms

    def _results(results) -> dict[str, Any]:
        return {"results": [{"id": r.id, "score": round(r.score, 6), "name": r.path.rsplit("/", 1)[-1],
                             "metadata": r.metadata, "image_url": f"/images/{r.id}",
                             "thumbnail_url": f"/thumbs/{r.id}"} for r in results]}  # fmt: skip

    async def _search(req: SearchRequest) -> dict[str, Any]:
        need_index()
        need_embedder()
        terms = await _terms(req)

        options = {"k": req.k, "threshold": req.threshold, "path": req.path, "after": req.after, "before": req.before}
        try:
            results = await svc.batchers["search"].submit((terms, options))  # batched with concurrent searches
        except KeyError as e:
            raise HTTPException(404, f"no indexed image has id {e.args[0] if e.args else ''}") from e
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        return _results(results)

    @app.post("/search", tags=["search"])
    async def search(req: SearchRequest, _=Depends(authorized)) -> dict[str, Any]:
        """Images of the index best matching a text, an image, an indexed image's id, or a weighted sum."""
        return await _search(req)

    @app.post("/search/upload", tags=["search"])
    async def search_upload(
        image: UploadFile = File(description="an image file: search by example"),
        text: str | None = Form(None),
        k: int = Form(20, ge=1, le=MAX_K),
        threshold: float | None = Form(None),
        _=Depends(authorized),
    ) -> dict[str, Any]:
        """Search by an uploaded image (multipart form), optionally plus a text."""
        data = await image.read(settings.max_body_bytes + 1)
        if len(data) > settings.max_body_bytes:
            raise HTTPException(413, f"the upload is over {settings.max_body_bytes:,} bytes")
        url = "data:;base64," + base64.b64encode(data).decode()
        return await _search(SearchRequest(image=url, text=text or None, k=k, threshold=threshold))

    async def _row(image_id: int):
        ix = need_index()
        rows = await svc.in_index_thread(ix.store.get, [image_id])
        if image_id not in rows:
            raise HTTPException(404, f"no indexed image has id {image_id}")
        return rows[image_id]

    @app.get("/images/{image_id}", tags=["search"])
    async def image_file(image_id: int, _=Depends(authorized)):
        """The indexed image with this id (by id only: no path from the request is ever read)."""
        row = await _row(image_id)
        import os

        if not os.path.isfile(row.path):
            raise HTTPException(410, f"image {image_id} is indexed but its file is gone; re-run mmfusion index")
        media = Image.MIME.get((row.format or "").upper(), "application/octet-stream")
        return FileResponse(row.path, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    thumbs = LRU(2048)

    @app.get("/thumbs/{image_id}", tags=["search"])
    async def thumbnail(image_id: int, _=Depends(authorized)):
        """A JPEG thumbnail (longest side ``thumb_size``) of the indexed image with this id."""
        row = await _row(image_id)
        key = (image_id, row.hash)
        data = thumbs.get(key)
        if data is None:
            data = await asyncio.get_running_loop().run_in_executor(None, _make_thumb, row.path, settings)
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/classify", tags=["labels"])
    async def classify(req: ClassifyRequest, _=Depends(authorized)) -> dict[str, Any]:
        """Zero-shot labels for an image (a data URL or an indexed id), with prompt ensembles."""
        import torch

        from ..tasks.labels import ZeroShotClassifier, is_sigmoid, probabilities, read_templates

        emb = need_embedder()
        if (req.image is None) == (req.id is None):
            raise HTTPException(400, "give exactly one of image (a data URL) or id")
        try:
            templates = read_templates(req.templates) if req.templates else None
            clf = ZeroShotClassifier(emb, req.labels, templates, cache_dir=None)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        if len(clf.labels) * len(clf.templates) > 20_000:
            raise HTTPException(413, "labels x templates is over 20,000 prompts; send fewer labels or templates")
        # label embeddings: every prompt of every label through the batched, cached text path
        texts = [t.replace("{}", lab) for lab in clf.labels for t in clf.templates]
        vecs = torch.from_numpy(np.stack(await svc.embed_texts(texts))).view(len(clf.labels), len(clf.templates), -1)
        clf._label_emb = torch.nn.functional.normalize(torch.nn.functional.normalize(vecs, dim=-1).mean(1), dim=-1)
        if req.image is not None:
            img = (await svc.embed_images([decode_data_url(req.image, settings.max_pixels)]))[0]
        else:
            ix = need_index()
            try:
                img = await svc.in_index_thread(ix.vector_of, req.id)
            except KeyError as e:
                raise HTTPException(404, f"no indexed image has id {req.id}") from e
        z = torch.from_numpy(np.asarray(img, dtype=np.float32))[None]
        sigmoid = is_sigmoid(emb)
        if req.threshold is not None:
            scores = probabilities(emb, z, clf.label_embeddings) if sigmoid else z @ clf.label_embeddings.T
            scored = zip(clf.labels, scores[0].tolist(), strict=True)
            pairs = [(lab, float(s)) for lab, s in scored if s >= req.threshold]
            pairs.sort(key=lambda p: -p[1])
        else:
            p = probabilities(emb, z, clf.label_embeddings)[0]
            top = p.topk(min(req.k, len(clf.labels)))
            pairs = [(clf.labels[j], float(s)) for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        return {"labels": [{"label": lab, "score": round(s, 6)} for lab, s in pairs],
                "score": "sigmoid" if sigmoid else ("cosine" if req.threshold is not None else "softmax")}  # fmt: skip

    add_chat_routes(app, svc, authorized)
    add_job_routes(app, svc, authorized)
    return app


def _make_thumb(path: str, settings: ServeSettings) -> bytes:
    from ..index.decode import decode_file

    try:
        img = decode_file(path, None, settings.max_pixels).pixels  # EXIF orientation applied, any mode to RGB
    except ImageDecodeError as e:
        raise HTTPException(422, f"cannot read the image: {e}") from e
    img = img.copy()
    img.thumbnail((settings.thumb_size, settings.thumb_size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _version() -> str:
    from .. import __version__

    return __version__
