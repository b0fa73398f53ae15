"""``mmfusion worker``: run caption, VQA and embedding job items taken from Redis, apart from the API replicas."""

from __future__ import annotations

import argparse
import dataclasses

EXAMPLES = """
examples:
  mmfusion worker --redis redis://localhost:6379/0 --captioner runs/demo/caption --answerer runs/demo/vqa
  mmfusion worker --redis redis://localhost:6379/0 --captioner hf:Salesforce/blip-image-captioning-base
  mmfusion worker --redis redis://redis:6379/0 --answerer hf:Qwen/Qwen2.5-VL-3B-Instruct --device cuda
  mmfusion worker --redis redis://redis:6379/0 --db /data/photos   # embeddings and mmfusion://images/<id> inputs

API replicas (mmfusion serve --redis URL --no-worker) enqueue jobs; each worker takes one image at a time from the
queues of the tasks it has a model for. An image whose worker is silent for --job-stale-s goes to another worker;
each image's result is kept once. SIGTERM: the current image is finished (within --grace s) or handed back.
"""

# the settings a worker reads (the rest of ServeSettings is about HTTP)
WORKER_SETTINGS = (
    "redis_url", "jobs_db", "db", "model", "captioner", "answerer", "device", "threads", "max_new_tokens",
    "max_pixels", "max_body_bytes", "allow_url_fetch", "job_heartbeat_s", "job_stale_s", "job_max_attempts",
    "max_batch_size", "max_wait_ms", "max_queue",
)  # fmt: skip


def add_parser(sub) -> None:
    from .serve_cmd import add_setting_flags

    p = sub.add_parser(
        "worker",
        help="run job items (captions, answers, embeddings) from Redis, apart from the API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Take job items from Redis and run them on the given models until SIGTERM.",
        epilog=EXAMPLES,
    )
    p.add_argument("--config", help="a YAML file with any of the settings below (as for mmfusion serve)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds to finish the current item after SIGTERM before handing it back (30)")  # fmt: skip
    add_setting_flags(p, only=WORKER_SETTINGS)
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    import asyncio

    from ..config import ConfigError
    from ..serve.settings import ServeSettings
    from ..serve.worker import run_worker

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion worker --help")
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ServeSettings)}
    settings = ServeSettings.load(args.config, **flags)

    def ready(svc) -> None:
        where = settings.redis_url or settings.jobs_db
        print(f"mmfusion worker {svc.jobs.worker} taking {', '.join(svc.jobs.tasks)} items from {where}", flush=True)

    return asyncio.run(run_worker(settings, args.grace, ready))
