"""Load on loopback: text-embedding requests from concurrent clients, with dynamic batching and without.

The service runs in a subprocess (uvicorn, as `mmfusion serve` runs it) with a native CLIP of the given
preset (random weights, a BPE tokenizer trained on ShapesWorld captions), once with
``--max-batch-size 32 --max-wait-ms 20`` and once with ``--max-batch-size 1`` (one model call per
request). ``--clients`` concurrent clients send ``POST /v1/embeddings`` with one caption each (every text
unique, so the cache never answers) for ``--seconds``; reported: requests/s, p50/p99 latency, errors,
and the batch-size histogram read from the server's /metrics.

Run: python benchmarks/bench_serve_load.py [--preset vit-b-32] [--clients 32] [--seconds 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx


def make_model(preset: str, path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch

    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.data.tokenizer import Tokenizer
    from mmfusion.models import create_model, save_model
    from mmfusion.models.registry import model_config

    _, cfg = model_config(preset)
    world = ShapesWorld()
    corpus = [c.text for i in range(3000) for c in world.captions(world.scene("train", i))]
    tok = Tokenizer.train(corpus, min(cfg.text.vocab_size, 1024), cfg.text.context_length)
    torch.manual_seed(0)
    save_model(create_model(preset, tokenizer=tok), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, batch: int, port: int, wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "-q", "serve", "--model", str(model), "--port", str(port),
           "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms), "--max-concurrency", "1024"]  # fmt: skip
    env = {**os.environ, "MMFUSION_TEXT_CACHE_SIZE": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


async def load(url: str, clients: int, seconds: float) -> dict:
    from mmfusion.data.shapes import ShapesWorld

    world = ShapesWorld()
    latencies: list[float] = []
    errors = 0
    counter = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal errors, counter
        while time.perf_counter() < stop_at:
            counter += 1
            text = f"{world.captions(world.scene('test', counter % 5000))[0].text} #{counter}"
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/embeddings", json={"input": text})
                ok = r.status_code == 200 and len(r.json()["data"]) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "errors": errors,
        "seconds": wall,
        "requests_per_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
    }


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative counts of the server's batch-size histogram for text (Prometheus buckets)."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('mmfusion_batch_size_bucket{batcher="text"'):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-b-32")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-wait-ms", type=float, default=20, help="the batching server's wait for a batch to fill")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = make_model(args.preset, Path("runs/bench-serve") / args.preset)
    results = {}
    for name, batch in (("batching (max 32)", 32), ("no batching", 1)):
        port = free_port()
        proc = start_server(model, batch, port, args.max_wait_ms)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load(url, 4, 3))  # warm-up
            r = asyncio.run(load(url, args.clients, args.seconds))
            r["batch_size_histogram"] = batch_histogram(url)
            results[name] = r
            print(f"{name}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                  f"{r['errors']} errors, batch sizes {r['batch_size_histogram']}", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    b, n = results["batching (max 32)"], results["no batching"]
    summary = {"throughput_ratio": b["requests_per_s"] / n["requests_per_s"], "p99_ratio": b["p99_ms"] / n["p99_ms"]}
    print(json.dumps(summary))
    if args.json:
        meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "preset": args.preset, "clients": args.clients, "seconds": args.seconds}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta | {"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
