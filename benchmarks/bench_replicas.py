"""One service process against two API replicas + two workers on Redis, side by side on this machine.

Arms (each a set of subprocesses started here, the arms taking turns):

* ``one``: ``mmfusion serve --model M`` (SQLite jobs, its own worker loop, the in-process text cache);
* ``two+two``: a redis-server (AOF on), ``mmfusion serve --model M --redis URL --no-worker`` twice and
  ``mmfusion worker --redis URL --model M`` twice; the clients spread their requests over both replicas.

Workloads, closed loop, ``--clients`` concurrent clients for ``--seconds`` each:

* ``embeddings``: ``POST /v1/embeddings`` with one unique ShapesWorld caption (no cache hits);
* ``jobs``: ``POST /jobs`` (task embed, ``--items`` data-URL images), then ``GET /jobs/{id}`` every 10 ms until it is
  done: jobs/s and the time from submission to the last result.

On 2 cores more processes cannot add capacity: the figures show what the Redis path costs (per-request and
per-job overhead, errors), not a speed-up. Run: python benchmarks/bench_replicas.py --json runs/bench-replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serve_load import captions, free_port, make_model, wait_until_serving  # noqa: E402


def start(argv: list[str], port: int | None, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mmfusion.cli.main", "-q", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    if port is not None:
        wait_until_serving(proc, port, lambda: proc.stderr.read().decode())
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def redis_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                             "--dir", str(tmp), "--protected-mode", "no"], stdout=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    import redis

    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def arm(name: str, model: Path, tmp: Path, env: dict) -> tuple[list[int], list[subprocess.Popen]]:
    if name == "one":
        port = free_port()
        return [port], [start(["serve", "--model", str(model), "--port", str(port)], port, env)]
    rproc, url = redis_server(tmp / "redis")
    procs = [rproc]
    ports = [free_port(), free_port()]
    for p in ports:
        procs.append(start(["serve", "--model", str(model), "--port", str(p), "--redis", url, "--no-worker"], p, env))
    for _ in range(2):
        procs.append(start(["worker", "--redis", url, "--model", str(model)], None, env))
    time.sleep(3)  # the workers load the model and announce what they run
    return ports, procs


def image_urls(n: int) -> list[str]:
    from mmfusion.data.shapes import ShapesWorld

    world, out = ShapesWorld(), []
    for i in range(n):
        buf = io.BytesIO()
        world.sample("test", i).image.save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


async def closed_loop(ports: list[int], clients: int, seconds: float, one) -> dict:
    """``clients`` loops calling ``one(client, port, k)`` (True when it succeeded), spreading over ``ports``."""
    lat, errors, counter = [], [], [0]
    stop_at = time.perf_counter() + seconds

    async def loop(c: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            while time.perf_counter() < stop_at:
                counter[0] += 1
                k = counter[0]
                t0 = time.perf_counter()
                try:
                    ok = await one(client, ports[k % len(ports)], k)
                except httpx.HTTPError as e:
                    ok = f"{type(e).__name__}: {e}"
                if ok is True:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors.append(str(ok))

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in range(clients)))
    took = time.perf_counter() - t0
    lat.sort()
    return {
        "per_s": round(len(lat) / took, 1),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
        "done": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def embeddings(ports, clients, seconds, texts) -> dict:
    async def one(client, port, k):
        r = await client.post(
            f"http://127.0.0.1:{port}/v1/embeddings", json={"input": [f"{texts[k % len(texts)]} #{k}"]}
        )
        return True if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"

    return await closed_loop(ports, clients, seconds, one)


async def jobs(ports, clients, seconds, urls, items) -> dict:
    async def one(client, port, k):
        imgs = [urls[(k * items + i) % len(urls)] for i in range(items)]
        r = await client.post(f"http://127.0.0.1:{port}/jobs", json={"task": "embed", "images": imgs})
        if r.status_code != 202:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        job = r.json()["id"]
        poll = ports[(k + 1) % len(ports)]  # read it on the other replica, when there are two
        while True:
            s = (await client.get(f"http://127.0.0.1:{poll}/jobs/{job}")).json()
            if s["status"] in ("done", "failed", "cancelled"):
                return True if s["status"] == "done" and s.get("done", items) == items else f"job {s['status']}"
            await asyncio.sleep(0.01)

    return await closed_loop(ports, clients, seconds, one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="clip-tiny", help="the model (random weights, a ShapesWorld tokenizer)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--items", type=int, default=4, help="images per job")
    ap.add_argument("--rounds", type=int, default=2, help="the arms take turns this often")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    model = make_model(args.preset, tmp / "model")
    env = {**os.environ, "MMFUSION_TEXT_CACHE_SIZE": "0", "OMP_NUM_THREADS": "1"}
    texts, urls = captions(2000), image_urls(64)
    results: dict[str, dict[str, list]] = {}
    try:
        for _ in range(args.rounds):
            for name in ("one", "two+two"):
                ports, procs = arm(name, model, tmp / name, env)
                try:
                    e = asyncio.run(embeddings(ports, args.clients, args.seconds, texts))
                    j = asyncio.run(jobs(ports, args.clients, args.seconds, urls, args.items))
                finally:
                    stop(procs)
                results.setdefault(name, {"embeddings": [], "jobs": []})
                results[name]["embeddings"].append(e)
                results[name]["jobs"].append(j)
                print(name, "embeddings", e, "jobs", j, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "clients": args.clients, "seconds": args.seconds, "items": args.items, "preset": args.preset}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(meta | {"results": results}, indent=2))


if __name__ == "__main__":
    main()
