"""What Redis costs: per job (SQLite store vs Redis store) and per cached text embedding (in-process LRU vs Redis).

Jobs: a :class:`~mmfusion.serve.service.Service` with a trivial captioner (it answers at once, so only the store and
the runner are timed) runs jobs of ``--items`` N tiny images, one after another: the time from ``create`` to the
job read back as ``done`` (polled every millisecond), per job and per image. Arms: the SQLite store (a file in a
temp dir, WAL), and the Redis store with its runner in the same process, on a redis-server this script starts on
loopback with AOF ``appendfsync always`` (what loses no acknowledged job) and ``everysec``.

Cache: ``Service.embed_texts`` of one text on a tiny native CLIP: a hit in the in-process LRU, a hit in Redis
(the text was embedded before, by this or another replica), and a miss (the model call, through the batcher with
``max_wait_ms`` 0). Medians over ``--repeats``.

Run: python benchmarks/bench_redis.py [--items 1 10 100] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image


class Instant:
    """A captioner that answers at once: the job's time is the store's and the runner's."""

    name = "instant"

    def caption(self, images, prompt=None, **options):
        return ["x" for _ in (images if isinstance(images, list) else [images])]


def start_redis(dir: Path, fsync: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                             "--appendfsync", fsync, "--dir", str(dir)], stdout=subprocess.DEVNULL)  # fmt: skip
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    r.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def time_jobs(settings, items: list[int], repeats: int) -> dict[str, dict[str, float]]:
    from mmfusion.serve.service import Service

    svc = await Service.open(settings, captioner=Instant())
    out = {}
    try:
        for n in items:
            req = {"task": "caption", "images": [tiny_png()] * n}
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                job_id = await asyncio.to_thread(svc.job_store.create, "", "caption", req, n)
                svc.jobs.wake()
                while (await asyncio.to_thread(svc.job_store.get, job_id, "", False))["status"] != "done":
                    await asyncio.sleep(0.001)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            out[str(n)] = {"job_ms": ms, "per_item_ms": ms / n}
    finally:
        await svc.close()
    return out


def tiny_clip(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch

    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.data.tokenizer import Tokenizer
    from mmfusion.models import create_model, save_model

    world = ShapesWorld()
    texts = ShapesWorld.vocabulary_texts() + [
        c.text for i in range(50) for c in world.captions(world.scene("train", i))
    ]
    torch.manual_seed(0)
    save_model(create_model("clip-tiny", Tokenizer.train(texts, 512, 24)), path)
    return path


async def time_cache(model: Path, redis_url: str, repeats: int) -> dict[str, float]:
    from mmfusion.serve.service import Service
    from mmfusion.serve.settings import ServeSettings

    out = {}
    for arm, extra in (("lru", {}), ("redis", {"redis_url": redis_url})):
        svc = await Service.open(ServeSettings(model=str(model), max_wait_ms=0, worker=False, **extra))
        try:
            misses, hits = [], []
            for i in range(repeats):
                text = f"a red circle {arm} {i} {time.time_ns()}"
                t0 = time.perf_counter()
                await svc.embed_texts([text])
                t1 = time.perf_counter()
                await svc.embed_texts([text])
                hits.append(time.perf_counter() - t1)
                misses.append(t1 - t0)
            out[f"{arm}_hit_ms"] = statistics.median(hits) * 1000
            out[f"{arm}_miss_ms"] = statistics.median(misses) * 1000
        finally:
            await svc.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[1, 10, 100], help="images per job")
    ap.add_argument("--repeats", type=int, default=20, help="jobs (and cache lookups) per measurement")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from mmfusion.serve.settings import ServeSettings

    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = ServeSettings(jobs_db=str(tmp / "jobs.sqlite"))
        results["jobs"] = {"sqlite": asyncio.run(time_jobs(settings, args.items, args.repeats))}
        procs = []
        try:
            for fsync in ("always", "everysec"):
                (tmp / fsync).mkdir()
                proc, url = start_redis(tmp / fsync, fsync)
                procs.append(proc)
                settings = ServeSettings(redis_url=url, job_heartbeat_s=1.0)
                results["jobs"][f"redis ({fsync})"] = asyncio.run(time_jobs(settings, args.items, args.repeats))
            results["cache"] = asyncio.run(time_cache(tiny_clip(tmp / "clip"), url, args.repeats))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    print(f"\njobs: create -> done, median of {args.repeats} (ms)")
    print(f"{'store':<20}" + "".join(f"{f'{n} items':>14}{'/item':>9}" for n in args.items))
    for arm, row in results["jobs"].items():
        print(f"{arm:<20}" + "".join(f"{row[str(n)]['job_ms']:>14.2f}{row[str(n)]['per_item_ms']:>9.2f}"
                                     for n in args.items))  # fmt: skip
    c = results["cache"]
    print(f"\ntext embedding of one text, median of {args.repeats} (ms)")
    print(f"{'':<20}{'hit':>10}{'miss':>10}")
    print(f"{'in-process LRU':<20}{c['lru_hit_ms']:>10.3f}{c['lru_miss_ms']:>10.3f}")
    print(f"{'Redis':<20}{c['redis_hit_ms']:>10.3f}{c['redis_miss_ms']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
