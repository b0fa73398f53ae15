"""Service settings: defaults <- a YAML file <- ``MMFUSION_*`` environment variables <- command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from ..config import field, from_dict, load_yaml

ENV_PREFIX = "MMFUSION_"


@dataclass
class ServeSettings:
    """How `mmfusion serve` runs. Every field can be set in YAML, as MMFUSION_<FIELD> or as --<field>."""

    host: str = field("127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network")
    port: int = field(8000, "TCP port")
    db: str | None = field(None, "an image index directory (mmfusion index): enables /search, /images, /thumbs")
    vectors: str | None = field(
        None,
        "the index's vector store at another address (milvus://HOST:PORT/COLLECTION: every replica searches "
        "one Milvus); default: the store the index recorded (FAISS, or the Milvus it was built into)",
    )
    snapshots: bool = field(
        False,
        "serve the --db index's published snapshots (mmfusion index --publish), swapping to each new version "
        "between requests: many replicas, one writer",
    )
    snapshot_poll_s: float = field(1.0, "with --snapshots: how often the version pointer is read")
    model: str | None = field(None, "the Embedder (default: the index's model); enables /v1/embeddings, /classify")
    device: str | None = field(None, "cpu, cuda or cuda:N (default: a GPU when there is one)")
    threads: int | None = field(
        None,
        "threads per model call: ONNX Runtime's intra-op threads for an export, torch's for a native or "
        "pretrained model (default: the physical cores); with several servers on one machine give each a share",
    )
    max_batch_size: int = field(32, "model calls batch up to this many requests (1: no batching)")
    max_wait_ms: float = field(5.0, "a request waits at most this long for others to join its batch")
    max_queue: int = field(1024, "requests waiting for the model beyond this get 503 (retry later)")
    max_concurrency: int = field(256, "requests in flight beyond this get 503 rather than slowing everyone")
    max_body_bytes: int = field(25 * 2**20, "larger request bodies get 413 (also when sent chunked)")
    max_body_memory: int = field(
        64 * 2**20,
        "request bodies over 64 KiB held in memory at once, in bytes; more wait their turn before being read",
    )
    max_pixels: int = field(40_000_000, "uploaded images with more pixels are refused before decoding")
    max_inputs: int = field(256, "most texts or images in one embeddings request")
    max_search_terms: int = field(16, "most query terms (texts, images, ids) in one search")
    max_prompts: int = field(4096, "most labels x templates in one classify request")
    max_chars: int = field(200_000, "most characters of text in one request (inputs, terms, prompts, messages)")
    text_cache_size: int = field(4096, "text embeddings kept in an LRU cache (0: none)")
    api_keys: list[str] = field(factory=list, help="accepted bearer keys; empty: no authentication")
    cors_origins: list[str] = field(factory=list, help="origins allowed to call from a browser; empty: none")
    allowed_hosts: list[str] = field(
        factory=list,
        help="Host names answered besides the bound address, localhost, "
        "127.0.0.1 and [::1] (and this machine's names when bound to 0.0.0.0); "
        "'*.example.com' matches subdomains, '*' any",
    )
    thumb_size: int = field(256, "longest side of thumbnails in pixels")
    captioner: str | None = field(
        None, "a Captioner: a run of mmfusion train caption, or e.g. hf:Salesforce/blip-image-captioning-base"
    )
    answerer: str | None = field(
        None, "an Answerer: a run of mmfusion train vqa, or e.g. hf:Qwen/Qwen2.5-VL-3B-Instruct (questions)"
    )
    reranker: str | None = field(
        None,
        "a re-ranker run (mmfusion train rerank) or a captioner run (scored by its captions' likelihood): "
        "searches with rerank=true re-order their top rerank_k by it",
    )
    rerank_k: int = field(20, "results a search with rerank=true re-ranks")
    labels: list[str] = field(factory=list, help="default zero-shot labels offered by the web page")
    jobs_db: str | None = field(None, "SQLite file for async jobs (default: jobs.sqlite in --db, else in memory)")
    max_job_images: int = field(10_000, "most images in one job")
    job_heartbeat_s: float = field(5.0, "a running job's worker shows it is alive this often")
    job_stale_s: float = field(
        30.0,
        "a running job whose worker was silent this long is marked failed (with --redis: the visibility "
        "timeout, after which another worker takes the item)",
    )
    redis_url: str | None = field(
        None,
        "redis://HOST:PORT/DB: jobs, workers and the text-embedding cache on Redis, shared by every replica "
        "(flag --redis; default: SQLite jobs and an in-process cache)",
    )
    worker: bool = field(True, "run job items in this process; --no-worker: an API replica that only enqueues")
    job_max_attempts: int = field(3, "with --redis: an image started this often by workers that died fails its job")
    cache_ttl_s: float = field(86400.0, "with --redis: a cached text embedding expires this long after it is written")
    max_new_tokens: int = field(64, "longest caption or answer, in tokens, unless a request asks for fewer")
    allow_url_fetch: bool = field(False, "read image_url http(s) URLs (never private or loopback addresses)")

    @classmethod
    def load(cls, yaml_path: str | os.PathLike | None = None, env: dict[str, str] | None = None, **flags: Any):
        """Settings from a YAML file, then the environment, then the flags given (None values are ignored)."""
        data: dict[str, Any] = dict(load_yaml(yaml_path)) if yaml_path else {}
        env = os.environ if env is None else env
        names = {f.name for f in fields(cls)}
        for name in names:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                data[name] = _parse_env(name, raw)
        data.update({k: v for k, v in flags.items() if v is not None and k in names})
        return from_dict(cls, data, prefix="serve.")

    @property
    def index_dir(self) -> Path | None:
        return Path(self.db).expanduser() if self.db else None


def _parse_env(name: str, raw: str) -> Any:
    """Environment values are text: lists are comma-separated, numbers and booleans read as YAML."""
    import yaml

    if get_origin(setting_types()[name]) is list:
        return [x.strip() for x in raw.split(",") if x.strip()]
    value = yaml.safe_load(raw)
    return raw if isinstance(value, (dict, list)) or value is None else value


@cache
def setting_types() -> dict[str, Any]:
    """Each setting's type, read from :class:`ServeSettings` (the CLI builds its flags from it)."""
    return get_type_hints(ServeSettings)
