"""``mmfusion serve``: the HTTP service (FastAPI + uvicorn, extra ``[serve]``)."""

from __future__ import annotations

import argparse

EXAMPLES = """
examples:
  mmfusion serve --db ~/.mmfusion/photos                        # search the index with its own model
  mmfusion serve --model hf:openai/clip-vit-base-patch32        # embeddings only
  mmfusion serve --db photos/ --answerer hf:Qwen/Qwen2.5-VL-3B-Instruct \
                 --captioner hf:Salesforce/blip-image-captioning-base     # questions and captions too
  mmfusion serve --config serve.yaml --port 9000
  MMFUSION_API_KEYS=key1,key2 mmfusion serve --db photos/       # every request needs 'Authorization: Bearer key1'

Routes: POST /v1/embeddings and GET /v1/models (OpenAI shapes; images as data URLs with "modality": "image"),
POST /search (text, image, id or weighted terms; k, threshold, path, after, before), POST /search/upload,
GET /images/{id}, GET /thumbs/{id}, POST /classify, POST /v1/chat/completions (questions and captions; images as
data URLs or mmfusion://images/<id>; stream: true for server-sent events), POST /jobs and GET /jobs/{id}
(captions or answers for many images, kept in SQLite), GET /healthz, GET /metrics (Prometheus), and the web
page at /.
The OpenAPI page (every body documented) is at /docs. Settings: flags > MMFUSION_<NAME> environment
variables > --config YAML > defaults. The service binds 127.0.0.1 unless --host says otherwise.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve embeddings, search and labels over HTTP (OpenAI-compatible)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the HTTP service on 127.0.0.1 (by default) for an image index and/or a model.",
        epilog=EXAMPLES,
    )
    p.add_argument("--config", help="a YAML file with any of the settings below")
    p.add_argument("--db", help="an image index directory (enables /search, /images, /thumbs)")
    p.add_argument("--model", help="the Embedder (default: the index's own model)")
    p.add_argument("--captioner", help="a Captioner for chat and jobs (e.g. hf:Salesforce/blip-image-captioning-base)")
    p.add_argument("--answerer", help="an Answerer for chat and jobs (e.g. hf:Qwen/Qwen2.5-VL-3B-Instruct)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--max-batch-size", type=int, help="model calls batch up to this many requests (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="how long a request waits for its batch to fill (default 5)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight before 503 (default 256)")
    p.add_argument("--max-body-bytes", type=int, help="413 for larger bodies (default 25 MiB)")
    p.add_argument("--max-new-tokens", type=int, help="longest caption or answer in tokens (default 64)")
    p.add_argument("--jobs-db", help="SQLite file for jobs (default: jobs.sqlite in --db, else in memory)")
    p.add_argument("--allow-url-fetch", action="store_true", default=None,
                   help="read http(s) image URLs in chat and jobs (never private or loopback addresses)")  # fmt: skip
    p.add_argument("--label", action="append", dest="labels", help="a zero-shot label the page offers (repeatable)")
    p.add_argument("--api-key", action="append", dest="api_keys", help="accept this bearer key (repeatable)")
    p.add_argument("--cors-origin", action="append", dest="cors_origins", help="allow this browser origin")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion serve --help")
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError("the service needs FastAPI and uvicorn: pip install 'mmfusion[serve]'") from e
    from ..serve.app import create_app
    from ..serve.settings import ServeSettings

    names = ("db", "model", "captioner", "answerer", "host", "port", "device", "max_batch_size", "max_wait_ms",
             "max_concurrency", "max_body_bytes", "max_new_tokens", "jobs_db", "allow_url_fetch", "labels", "api_keys",
             "cors_origins")  # fmt: skip
    flags = {k: getattr(args, k) for k in names}
    settings = ServeSettings.load(args.config, **flags)
    if not (settings.db or settings.model or settings.captioner or settings.answerer):
        raise ValueError("nothing to serve: give --db (an index), --model, --captioner and/or --answerer")
    app = create_app(settings)
    print(f"mmfusion serving on http://{settings.host}:{settings.port}  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning" if args.quiet else "info")
    return 0
