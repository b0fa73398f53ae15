"""Load on loopback: text-embedding requests from concurrent clients, with dynamic batching and without.

The service runs in a subprocess (uvicorn, as `mmfusion serve` runs it) with a native CLIP of the given
preset (random weights, a BPE tokenizer trained on ShapesWorld captions), text cache off. Two arms, the
same server and settings but the batcher's: ``--max-batch-size 32 --max-wait-ms 20`` and
``--max-batch-size 1 --max-wait-ms 0`` (one model call per request). In each arm ``--clients`` concurrent
clients send ``POST /v1/embeddings`` with one caption each (every text unique) for ``--seconds``, with
``encoding_format`` base64 by default, as the OpenAI Python SDK sends it (``--encoding float`` for JSON
floats). The clients are asyncio tasks in this process (a separate one from the server's, unpinned in both
arms), each on one keep-alive connection of a minimal HTTP/1.1 client: httpx took ~2 ms of CPU a request,
which on a 2-core machine the server's model then lacks.

Reported per arm: requests/s, p50/p99 latency, errors, the batch-size histogram and model time per call read
from the server's /metrics (this run's requests only), and CPU per request of the server and of the clients.
Before the arms, the model alone is timed per batch size in this process (the ceiling batching can reach).

``--route search`` sends ``POST /search`` (a caption, k 10) instead, against an index of ``--gallery`` images
(default 20,000: 16 real ShapesWorld images indexed by the served model, the rest rows with random unit
vectors, which cost the same to search): each request is one text embedding and one index search, and both
are batched across requests in the batching arm. The index alone is then timed per batch size as well.

Run: python benchmarks/bench_serve_load.py [--preset vit-b-32] [--route embeddings|search] [--clients 32]
     [--seconds 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx

ARMS = {"batching": (32, 20.0), "no batching": (1, 0.0)}  # name -> (max batch size, max wait ms)


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


def make_gallery(model: Path, path: Path, n: int) -> Path:
    """An index of ``n`` images for the search route: 16 real ShapesWorld images embedded by ``model`` (so the
    index knows its model), plus ``n - 16`` rows with random unit vectors; FAISS is rebuilt from SQLite."""
    import hashlib

    import numpy as np

    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.index import Index

    done = path / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"model": str(model), "n": n}:
        return path / "db"
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    photos = path / "photos"
    photos.mkdir(parents=True)
    world = ShapesWorld()
    for i in range(16):
        world.sample("test", i).image.save(photos / f"scene{i:02d}.png")
    rng = np.random.default_rng(0)
    with Index.open(path / "db", model=str(model), write=True) as ix:
        ix.update([photos], progress=False)
        dim, root = ix.dim, str(photos.resolve())
        with ix.store.transaction():
            for start in range(0, n - 16, 5000):
                vecs = rng.standard_normal((min(5000, n - 16 - start), dim)).astype(np.float32)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                rows = []
                for j, v in enumerate(vecs):
                    name = f"{root}/synthetic/{start + j:07d}.png"
                    rows.append({"path": name, "display": name, "root": root, "size": 1, "mtime_ns": 0,
                                 "hash": hashlib.blake2b(name.encode(), digest_size=16).digest(),
                                 "indexed_at": time.time(), "vector": v})  # fmt: skip
                ix.store.insert(rows)
    with Index.open(path / "db", write=True) as ix:  # FAISS catches up with SQLite on opening, and is saved
        assert len(ix.vi) == n, (len(ix.vi), n)
    done.write_text(json.dumps({"model": str(model), "n": n}))
    return path / "db"


def index_table(db: Path, model: Path, texts: list[str], sizes: tuple[int, ...] = (1, 8, 32)) -> dict[int, float]:
    """Milliseconds per query of the index alone (``Index.search_many``, k 10) at each batch size."""
    import numpy as np

    from mmfusion.index import Index, VectorQuery

    with Index.open(db) as ix:
        rng = np.random.default_rng(1)
        vecs = rng.standard_normal((64, ix.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        out = {}
        for size in sizes:
            times = []
            for r in range(max(3, 64 // size)):
                batch = [VectorQuery(vecs[(r * size + i) % 64], k=10) for i in range(size)]
                t0 = time.perf_counter()
                ix.search_many(batch)
                times.append(time.perf_counter() - t0)
            out[size] = 1000 * statistics.median(times) / size
    return out


def captions(n: int = 5000) -> list[str]:
    """Test-split ShapesWorld captions, made before the clocks start (a request only adds its counter)."""
    from mmfusion.data.shapes import ShapesWorld

    world = ShapesWorld()
    return [world.captions(world.scene("test", i))[0].text for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, batch: int, port: int, wait_ms: float, db: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "-q", "serve", "--model", str(model), "--port", str(port),
           "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms), "--max-concurrency", "1024"]  # fmt: skip
    if db is not None:
        cmd += ["--db", str(db)]
    env = {**os.environ, "MMFUSION_TEXT_CACHE_SIZE": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_until_serving(proc, port, lambda: proc.stderr.read().decode())


def wait_until_serving(proc: subprocess.Popen, port: int, stderr, seconds: float = 120) -> subprocess.Popen:
    """``proc`` once its /healthz answers 200; an error with the end of ``stderr()`` if it exits first."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {stderr()[-2000:]}")
    proc.kill()
    raise RuntimeError(f"the server did not start in {seconds:.0f} s")


# ---- the clients ----------------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads Content-Length replies: all the load
    generator needs, at a fraction of a general client's CPU."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + body)
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines if ": " in line)
        if "content-length" not in headers:
            raise ValueError(f"a reply without Content-Length ({status_line!r}): this client reads no other kind")
        data = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection") == "close":
            self.close()
        return int(status_line.split(" ", 2)[1]), data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def check_embedding(data: bytes, encoding: str, dim: int | None) -> bool:
    """Whether a reply holds one embedding of ``dim`` numbers (any width when ``dim`` is None)."""
    items = json.loads(data)["data"]
    if len(items) != 1:
        return False
    emb = items[0]["embedding"]
    n = len(base64.b64decode(emb)) // 4 if encoding == "base64" else len(emb)
    return dim is None or n == dim


def check_search(data: bytes, k: int) -> bool:
    """Whether a reply holds ``k`` search results, best first."""
    scores = [r["score"] for r in json.loads(data)["results"]]
    return len(scores) == k and scores == sorted(scores, reverse=True)


async def closed_loop(port: int, clients: int, seconds: float, request, start: int) -> dict:
    """``clients`` closed-loop clients for ``seconds``; request ``k`` is ``request(k)``: (path, JSON body, a check
    of a 200 reply's bytes). Counts ``k`` from ``start``; the result's ``next`` is where the next run starts."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = start
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal counter
        conn = Connection(port)
        try:
            while time.perf_counter() < stop_at:
                counter += 1
                path, body, check = request(counter)
                t0 = time.perf_counter()
                try:
                    status, data = await conn.post(path, body)
                    ok = status == 200 and check(data)
                    why = "" if ok else f"HTTP {status}: {data[:200]!r}"
                except (OSError, ValueError, KeyError, asyncio.IncompleteReadError) as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
                    conn.close()
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures.append(why)
        finally:
            conn.close()

    cpu0, t0 = _cpu_self(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies": latencies, "failures": failures, "seconds": time.perf_counter() - t0,
            "client_cpu": _cpu_self() - cpu0, "next": counter}  # fmt: skip


async def load(port: int, clients: int, seconds: float, texts: list[str], encoding: str, start: int,
               route: str = "embeddings") -> dict:  # fmt: skip
    """:func:`closed_loop` on texts. Text ``k`` is caption ``k`` plus `` #k``: unique, the same ones in both arms,
    and with 7-digit counters everywhere, as long in each (``start`` picks the first ``k``)."""

    def request(k: int):
        text = f"{texts[k % len(texts)]} #{k}"
        if route == "search":
            return "/search", json.dumps({"text": text, "k": 10}).encode(), lambda data: check_search(data, 10)
        body = json.dumps({"input": text, "encoding_format": encoding}).encode()
        return "/v1/embeddings", body, lambda data: check_embedding(data, encoding, None)

    return await closed_loop(port, clients, seconds, request, start)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- what the server says -------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The batchers' series from /metrics: batch-size buckets (cumulative), batch seconds sum and count."""
    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(("mmfusion_batch_size_", "mmfusion_batch_seconds_")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def batch_report(before: dict[str, float], after: dict[str, float], batcher: str = "text") -> dict:
    """This run's calls of one batcher: a histogram of batch sizes over the Prometheus buckets, mean size, time."""
    label = f'batcher="{batcher}"'
    delta = {k.replace(label, 'batcher="text"'): after[k] - before.get(k, 0.0) for k in after if label in k}
    edges = sorted(
        (float(k.split('le="')[1].split('"')[0]), v) for k, v in delta.items() if k.startswith("mmfusion_batch_size_b")
    )
    histogram, lo, prev = {}, 1, 0.0
    for le, cum in edges:
        if cum > prev:
            hi = "inf" if le == float("inf") else int(le)
            histogram[str(hi) if lo == hi else f"{lo}-{hi}"] = int(cum - prev)
        prev, lo = cum, int(le) + 1 if le != float("inf") else lo
    calls = delta.get('mmfusion_batch_size_count{batcher="text"}', 0.0)
    items = delta.get('mmfusion_batch_size_sum{batcher="text"}', 0.0)
    busy = delta.get('mmfusion_batch_seconds_sum{batcher="text"}', 0.0)
    return {
        "calls": int(calls),
        "histogram": histogram,
        "mean_batch": items / calls if calls else float("nan"),
        "model_ms_per_call": 1000 * busy / calls if calls else float("nan"),
        "model_ms_per_item": 1000 * busy / items if items else float("nan"),
        "model_busy_s": busy,
    }


def model_table(model: Path, texts: list[str], sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict[str, dict]:
    """Milliseconds per text of the model alone at each batch size: in one call of ``encode_text``, and as the
    server runs a batch (``QueryEncoder.encode_texts``: tokenized at once, run in groups of similar length)."""
    import torch

    import mmfusion
    from mmfusion.index.encoder import QueryEncoder

    embedder = mmfusion.load(str(model), device="cpu")
    ways = {"one call": embedder.encode_text, "as served": QueryEncoder(embedder).encode_texts}
    out: dict[str, dict] = {way: {} for way in ways}
    n = 9 * 10**6
    with torch.inference_mode():
        for size in sizes:
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(max(4, 48 // size)):
                batch = [f"{texts[(n + i) % len(texts)]} #{n + i}" for i in range(size)]
                n += size
                for way, fn in ways.items():  # the same texts both ways, in turn
                    t0 = time.perf_counter()
                    fn(batch)
                    times[way].append(time.perf_counter() - t0)
            for way in ways:
                out[way][size] = 1000 * statistics.median(times[way]) / size
    return out


# ---- the run --------------------------------------------------------------------------------------------


class Arm:
    """One server and what its clients saw, summed over the rounds."""

    def __init__(self, name: str, model: Path, batch: int, wait_ms: float, db: Path | None = None):
        self.name, self.batch, self.wait_ms = name, batch, wait_ms
        self.route = "search" if db is not None else "embeddings"
        self.port = free_port()
        self.proc = start_server(model, batch, self.port, wait_ms, db)
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.seconds = self.client_cpu = self.server_cpu = 0.0
        self.next = 10**6
        self.metrics: dict[str, float] = {}

    def warm_up(self, texts: list[str], encoding: str) -> None:
        asyncio.run(load(self.port, 4, 3, texts, encoding, start=8 * 10**6, route=self.route))  # not counted
        self.metrics = scrape(self.port)

    def measure(self, clients: int, seconds: float, texts: list[str], encoding: str) -> None:
        cpu0 = _cpu_of(self.proc.pid)
        r = asyncio.run(load(self.port, clients, seconds, texts, encoding, start=self.next, route=self.route))
        self.server_cpu += _cpu_of(self.proc.pid) - cpu0
        self.latencies += r["latencies"]
        self.failures += r["failures"]
        self.seconds += r["seconds"]
        self.client_cpu += r["client_cpu"]
        self.next = r["next"]

    def report(self, before: dict[str, float]) -> dict:
        lat, n = sorted(self.latencies), len(self.latencies)
        out = {
            "max_batch_size": self.batch,
            "max_wait_ms": self.wait_ms,
            "requests": n,
            "errors": len(self.failures),
            "error_samples": sorted(set(self.failures))[:5],
            "seconds": self.seconds,
            "requests_per_s": n / self.seconds,
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * lat[min(n - 1, int(0.99 * n))] if lat else float("nan"),
            "server_cpu_ms_per_request": 1000 * self.server_cpu / max(n, 1),
            "client_cpu_ms_per_request": 1000 * self.client_cpu / max(n, 1),
        }
        after = scrape(self.port)
        out |= batch_report(before, after)
        if self.route == "search":
            out["search"] = batch_report(before, after, "search")
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def describe(name: str, r: dict) -> str:
    search = r.get("search")
    extra = "" if search is None else (f"; index: {search['calls']} calls, mean batch {search['mean_batch']:.1f}, "
                                       f"{search['model_ms_per_item']:.2f} ms/query")  # fmt: skip
    return describe_main(name, r) + extra


def describe_main(name: str, r: dict) -> str:
    return (f"{name} (max {r['max_batch_size']}, wait {r['max_wait_ms']:g} ms): {r['requests_per_s']:.1f} req/s, "
            f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['errors']} errors {r['error_samples'] or ''}; "
            f"{r['calls']} model calls, mean batch {r['mean_batch']:.1f}, sizes {r['histogram']}, model "
            f"{r['model_ms_per_call']:.1f} ms/call = {r['model_ms_per_item']:.2f} ms/text, busy "
            f"{r['model_busy_s'] / r['seconds']:.0%}; CPU per request: server {r['server_cpu_ms_per_request']:.1f} "
            f"ms, clients {r['client_cpu_ms_per_request']:.2f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-b-32")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60, help="load time of each arm (all rounds together)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="the arms take turns this many times (AB BA AB ...), so that load from other programs "
                         "on the machine falls on both alike")  # fmt: skip
    ap.add_argument("--encoding", choices=("base64", "float"), default="base64",
                    help="encoding_format of the requests (base64 is the OpenAI Python SDK's default)")  # fmt: skip
    ap.add_argument("--max-wait-ms", type=float, default=ARMS["batching"][1], help="the batching arm's max wait")
    ap.add_argument("--no-model-table", action="store_true", help="skip timing the model alone per batch size")
    ap.add_argument("--route", choices=("embeddings", "search"), default="embeddings",
                    help="POST /v1/embeddings, or POST /search against an index of --gallery images")  # fmt: skip
    ap.add_argument("--gallery", type=int, default=20_000, help="images in the searched index (--route search)")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = make_model(args.preset, Path("runs/bench-serve") / args.preset)
    texts = captions()
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "preset": args.preset, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
            "encoding": args.encoding, "route": args.route, "loadavg_start": os.getloadavg()}  # fmt: skip
    db = None
    if args.route == "search":
        db = make_gallery(model, Path("runs/bench-serve") / f"gallery-{args.preset}", args.gallery)
        meta["gallery"] = args.gallery
        meta["index_ms_per_query"] = index_table(db, model, texts)
        print(
            "index alone, ms per query by batch size:", {k: round(v, 2) for k, v in meta["index_ms_per_query"].items()}
        )
    if not args.no_model_table:
        table = model_table(model, texts)
        meta["model_ms_per_text"] = table
        for way, row in table.items():
            print(f"model alone ({way}), ms per text by batch size:", {k: round(v, 2) for k, v in row.items()})
    arms = []
    try:
        for name, (batch, wait_ms) in ARMS.items():
            arms.append(Arm(name, model, batch, args.max_wait_ms if batch > 1 else wait_ms, db))
        before = {}
        for arm in arms:
            arm.warm_up(texts, args.encoding)
            before[arm.name] = arm.metrics
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                arm.measure(args.clients, args.seconds / args.rounds, texts, args.encoding)
        results = {arm.name: arm.report(before[arm.name]) for arm in arms}
    finally:
        for arm in arms:
            arm.stop()
    meta["loadavg_end"] = os.getloadavg()
    for name, r in results.items():
        print(describe(name, r), flush=True)
    b, n = results["batching"], results["no batching"]
    summary = {"throughput_ratio": b["requests_per_s"] / n["requests_per_s"], "p99_ratio": b["p99_ms"] / n["p99_ms"],
               "errors": b["errors"] + n["errors"],
               "load_1min_start_end": [meta["loadavg_start"][0], meta["loadavg_end"][0]]}  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta | {"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
