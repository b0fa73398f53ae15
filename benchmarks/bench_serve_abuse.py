"""The service under abuse: every bad input of the hardening issue, under a 16-client load, and the memory a
burst of large bodies costs.

The service runs in a subprocess (`mmfusion serve`, uvicorn) with a native clip-tiny (random weights, a BPE
tokenizer trained on ShapesWorld captions), an index of 24 ShapesWorld images and a random caption-tiny
captioner. Two parts:

1. **Abuse suite**: each case (ids past SQLite's range, NaN, -1, 2,000 terms, 256 texts of 64 KiB, 2,000 labels
   x 10 templates, a hostile Host, max_tokens over the limit, a 1 GiB Content-Length, a chunked body over the
   limit, a PNG claiming 60000x60000, path traversal, a wrong method, deep nesting, a lone surrogate) is sent
   once while ``--clients`` clients keep searching. Reported per case: status, seconds, whether the body is
   JSON, whether it names a server path; then the load's requests and errors, and the server log's tracebacks.
2. **Memory**: the server's resident memory (VmRSS, sampled every 5 ms) at rest, at its peak while
   ``--bodies`` clients each send a ~24 MB body at once (a data URL of a real 2,450 x 2,450 noise PNG to
   /v1/embeddings), and 2 s after the burst.

``--src DIR`` runs the server from another checkout's ``src`` (e.g. the commit before the hardening) to compare.

Run: python benchmarks/bench_serve_abuse.py [--clients 16] [--bodies 16] [--src DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_load import Connection, free_port, make_model, wait_until_serving  # noqa: E402

HUGE = "99999999999999999999999"


def make_captioner(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch

    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.data.tokenizer import Tokenizer
    from mmfusion.models import create_model, save_model
    from mmfusion.models.registry import model_config

    _, cfg = model_config("caption-tiny")
    world = ShapesWorld()
    corpus = [c.text for i in range(2000) for c in world.captions(world.scene("train", i))]
    tok = Tokenizer.train(corpus, min(cfg.decoder.vocab_size, 1024), cfg.decoder.context_length)
    torch.manual_seed(0)
    save_model(create_model("caption-tiny", tokenizer=tok), path)
    return path


def make_index(model: Path, path: Path) -> Path:
    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.index import Index

    db = path / "db"
    if (db / "index.sqlite").is_file():
        return db
    photos = path / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld()
    for i in range(24):
        world.sample("test", i).image.save(photos / f"scene{i:02d}.png")
    with Index.open(db, model=str(model), write=True) as ix:
        ix.update([photos], progress=False)
    return db


def start(args, model: Path, captioner: Path, db: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "serve", "--db", str(db), "--captioner", str(captioner),
           "--port", str(port)]  # fmt: skip
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    return wait_until_serving(proc, port, log.read_text)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raw_request(port: int, data: bytes, chunks: list[bytes] | None = None, timeout: float = 30) -> bytes:
    """Send bytes as they are (and then ``chunks`` as chunked encoding); the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            for c in chunks or ():
                s.sendall(f"{len(c):x}\r\n".encode() + c + b"\r\n")
            if chunks:
                s.sendall(b"0\r\n\r\n")
        except OSError:  # refused mid-body: the reply is waiting
            pass
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not got:
                break
            out += got
            if b"\r\n\r\n" in out:
                head, body = out.split(b"\r\n\r\n", 1)
                length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        return out


def http(method: str, path: str, body: bytes = b"", host: str = "127.0.0.1", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


def png_header_url(w: int, h: int) -> str:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def cases() -> list[tuple[str, bytes, list[bytes] | None]]:
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    chat = lambda url, **kw: j({"messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "image_url", "image_url": {"url": url}}]}], **kw})  # fmt: skip
    return [
        ("GET /images/<huge id>", http("GET", f"/images/{HUGE}"), None),
        ("GET /thumbs/<huge id>", http("GET", f"/thumbs/{HUGE}"), None),
        ("/search id 2**63", http("POST", "/search", j({"id": 2**63})), None),
        ("/classify id 2**63", http("POST", "/classify", j({"labels": ["a"], "id": 2**63})), None),
        (
            "chat mmfusion://images/<huge>",
            http("POST", "/v1/chat/completions", chat(f"mmfusion://images/{HUGE}")),
            None,
        ),
        ("job with a huge id", http("POST", "/jobs", j({"task": "caption", "images": [int(HUGE)]})), None),
        ("/v1/embeddings {x: NaN}", http("POST", "/v1/embeddings", b'{"x": NaN}'), None),
        ("/search weight Infinity", http("POST", "/search", b'{"terms": [{"text": "a", "weight": Infinity}]}'), None),
        ("/search id -1", http("POST", "/search", j({"id": -1})), None),
        (
            "/search 2,000 terms",
            http("POST", "/search", j({"terms": [{"text": f"a red circle number {i}"} for i in range(2000)]})),
            None,
        ),  # fmt: skip
        ("256 texts of 64 KiB", http("POST", "/v1/embeddings", j({"input": ["x" * 65536] * 256})), None),
        (
            "/classify 2,000 labels x 10 templates",
            http(
                "POST",
                "/classify",
                j(
                    {
                        "labels": [f"label {i}" for i in range(2000)],
                        "id": 1,
                        "templates": [f"a photo {i} of a {{}}" for i in range(10)],
                    }
                ),
            ),
            None,
        ),  # fmt: skip
        ("Host: evil.example", http("GET", "/healthz", host="evil.example"), None),
        (
            "max_tokens 100000",
            http("POST", "/v1/chat/completions", chat("mmfusion://images/1", max_tokens=100000)),
            None,
        ),
        (
            "1 GiB Content-Length",
            http("POST", "/v1/embeddings").replace(b"Content-Length: 0", b"Content-Length: 1073741824"),
            None,
        ),
        (
            "chunked 40 MB",
            http("POST", "/v1/embeddings", extra="Transfer-Encoding: chunked\r\n").replace(
                b"Content-Length: 0\r\n", b""
            ),
            [b"x" * 1_000_000] * 40,
        ),  # fmt: skip
        (
            "PNG claiming 60000x60000",
            http("POST", "/v1/embeddings", j({"input": [png_header_url(60000, 60000)], "modality": "image"})),
            None,
        ),
        ("path traversal", http("GET", "/images/..%2f..%2fetc%2fpasswd"), None),
        ("wrong method", http("DELETE", "/search"), None),
        ("deep nesting (1 MB of [)", http("POST", "/search", b"[" * 1_000_000), None),
        ("lone surrogate", http("POST", "/v1/embeddings", b'{"input": "\\ud800"}'), None),
    ]


async def load(port: int, clients: int, stop: asyncio.Event) -> tuple[int, int]:
    ok = errors = 0

    async def client(i: int):
        nonlocal ok, errors
        conn = Connection(port)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                status, _ = await conn.post("/search", json.dumps({"text": f"a red circle {i} {n}", "k": 5}).encode())
                ok += status == 200
                errors += status != 200
            except Exception:
                errors += 1
                conn.close()
                conn = Connection(port)
        conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return ok, errors


def run_cases(port: int, secrets: list[str]) -> list[dict]:
    out = []
    for name, data, chunks in cases():
        t0 = time.perf_counter()
        reply = raw_request(port, data, chunks)
        seconds = time.perf_counter() - t0
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        try:
            json.loads(body)
            is_json = True
        except ValueError:
            is_json = False
        leak = any(s.encode() in reply for s in secrets)
        out.append({"case": name, "status": status, "seconds": round(seconds, 3), "json": is_json, "leak": leak})
    return out


def memory_burst(port: int, pid: int, bodies: int) -> dict:
    import httpx
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (2450, 2450, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    body = json.dumps({"input": ["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()],
                       "modality": "image"}).encode()  # fmt: skip
    del buf
    for _ in range(2):  # warm: the first large request allocates what every later one reuses
        httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", content=body, timeout=300,
                   headers={"content-type": "application/json"})  # fmt: skip
    time.sleep(2)
    before = rss_mb(pid)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def burst():
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            rs = await asyncio.gather(*(client.post(f"http://127.0.0.1:{port}/v1/embeddings", content=body,
                                                    headers={"content-type": "application/json"})
                                        for _ in range(bodies)))  # fmt: skip
            return [r.status_code for r in rs], time.perf_counter() - t0

    statuses, seconds = asyncio.run(burst())
    time.sleep(2)
    done.set()
    sampler.join()
    after = rss_mb(pid)
    return {"body_mb": round(len(body) / 1e6, 1), "bodies": bodies, "statuses": sorted(set(statuses)),
            "seconds": round(seconds, 2), "rss_before_mb": round(before), "rss_peak_mb": round(peak[0]),
            "rss_after_mb": round(after), "peak_over_mb": round(peak[0] - before),
            "after_over_mb": round(after - before)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--bodies", type=int, default=16)
    ap.add_argument("--src", help="serve from this src directory (PYTHONPATH), e.g. an older checkout's")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "mmfusion-bench-abuse"))
    ap.add_argument("--json")
    args = ap.parse_args()
    cache = Path(args.cache)
    model = make_model("clip-tiny", cache / "clip")
    captioner = make_captioner(cache / "caption")
    db = make_index(model, cache)
    port, log = free_port(), cache / "server.log"
    proc = start(args, model, captioner, db, port, log)
    try:
        stop = asyncio.Event()

        async def suite():
            task = asyncio.create_task(load(port, args.clients, stop))
            await asyncio.sleep(2)
            results = await asyncio.to_thread(run_cases, port, [str(cache), str(db)])
            stop.set()
            return results, await task

        results, (ok, errors) = asyncio.run(suite())
        memory = memory_burst(port, proc.pid, args.bodies)
    finally:
        proc.terminate()
        proc.wait(30)
    tracebacks = log.read_text(errors="replace").count("Traceback")
    print(f"{'case':40s} {'status':>6s} {'s':>7s} json leak")
    for r in results:
        print(f"{r['case']:40s} {r['status']:6d} {r['seconds']:7.3f} {'yes' if r['json'] else 'NO':4s} "
              f"{'LEAK' if r['leak'] else 'no'}")  # fmt: skip
    fives = sum(r["status"] >= 500 or r["status"] == 0 for r in results)
    slow = max(r["seconds"] for r in results)
    print(f"5xx: {fives}; slowest: {slow:.3f} s; load during it: {ok} searches, {errors} errors; "
          f"tracebacks in the server log: {tracebacks}")  # fmt: skip
    print(f"memory: {memory}")
    report = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cpus", "src": args.src or "this checkout", "cases": results,
              "load": {"clients": args.clients, "ok": ok, "errors": errors}, "tracebacks": tracebacks,
              "memory": memory}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
