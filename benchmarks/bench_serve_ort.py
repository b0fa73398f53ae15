"""The service's embeddings route on ONNX Runtime against torch: throughput, latency and the server's memory.

For each model (``--models``, default ``clip-tiny,vit-b-32``: the native presets with random weights and a BPE
tokenizer trained on ShapesWorld captions, made by ``bench_serve_load.make_model`` and cached in
``runs/bench-serve``), three servers run side by side, each a ``mmfusion serve --model ...`` subprocess
(uvicorn, the service's default batching: ``--max-batch-size 32 --max-wait-ms 5``, text cache off):

* **torch fp32**: the native checkpoint;
* **ORT fp32**: its ONNX export (``mmfusion export onnx --model CKPT --out DIR``);
* **ORT int8**: that export quantised (``mmfusion quantize --model DIR --out DIR8 --mode dynamic --verify shapes
  --max-drop 1 --n 200``: the gate is opened wide, the model is random).

The exports are kept in ``runs/bench-serve-ort`` and reused unless ``--fresh``. Threads are pinned alike, to
``--threads`` (default 1): torch's through ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in every server's
environment, ONNX Runtime's intra-op threads through the ``threads`` argument of its sessions, which the service
leaves unset (ONNX Runtime then takes the physical cores): each server runs ``mmfusion serve`` through
:data:`LAUNCH`, which sets that default before calling the CLI's ``main`` (the same code path, torch not imported
by it). One thread each, as in the export benchmark: the clients share this 2-core machine with the servers, and
torch's 2-thread team stalls when the other core is busy.

``--clients`` concurrent clients (asyncio tasks in this process, one keep-alive connection each, the minimal
HTTP/1.1 client of ``bench_serve_load``) send ``POST /v1/embeddings`` with one input each, base64 output, for
``--seconds`` per server and modality, the servers taking turns (``--rounds``, ABC CBA ...): first texts (a
test-split ShapesWorld caption plus a unique counter, so that no two are alike), then images (``"modality":
"image"``, a data URL of one of 64 ShapesWorld test images, 64 px PNGs, rotating). Reported per server and
modality: requests/s, p50/p99 latency, errors; per server: resident memory once loaded (VmRSS), its peak after
the text load and after the image load (VmHWM, from ``/proc/PID/status``), and whether the process mapped torch.

``--alone`` serves nothing: each model is loaded alone in a fresh process (the ORT ones with ``import torch``
blocked, as in a torch-free install) and embeds 32 texts and 32 images three times; its VmRSS and VmHWM then.

Run: python benchmarks/bench_serve_ort.py [--models clip-tiny,vit-b-32] [--clients 32] [--seconds 15]
     [--rounds 2] [--threads 1] [--alone] [--json runs/bench-serve-ort.json]
As measured in BENCHMARKS.md (2026-12-05; 343 s, exports and quantisation included):
     python benchmarks/bench_serve_ort.py --seconds 12 --json runs/bench-serve-ort.json
     python benchmarks/bench_serve_ort.py --alone --json runs/bench-serve-ort-alone.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_load import captions, closed_loop, free_port, make_model, wait_until_serving  # noqa: E402

ROOT = Path("runs/bench-serve-ort")
BACKENDS = ("torch fp32", "ORT fp32", "ORT int8")
# `mmfusion serve ARGS` with ONNX Runtime's intra-op threads defaulting to $BENCH_ORT_THREADS (the service has no
# setting for them; a native model's torch threads follow OMP_NUM_THREADS)
LAUNCH = """
import os, sys
import mmfusion.backends.ort as ort
session, n = ort._session, int(os.environ["BENCH_ORT_THREADS"])
ort._session = lambda path, device, threads: session(path, device, threads or n)
from mmfusion.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
# the embedder alone in a fresh process: load, embed 32 texts and 32 images 3 times, then VmRSS/VmHWM (kB);
# argv: MODEL block|torch ("block" makes `import torch` fail, as in a torch-free install)
ALONE = """
import contextlib, json, sys
if sys.argv[2] == "block":
    sys.modules["torch"] = None
import numpy as np
from PIL import Image
import mmfusion
m = mmfusion.load(sys.argv[1])
texts = [f"a red circle and {i} blue squares" for i in range(32)]
imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(32)]
t = getattr(m, "transform", None)
with contextlib.nullcontext() if sys.argv[2] == "block" else sys.modules["torch"].inference_mode():
    for _ in range(3):
        m.encode_text(texts)
        m.encode_image(t(imgs) if t is not None else imgs)
rows = (ln.partition(":") for ln in open("/proc/self/status"))
st = {k: int(v.split()[0]) for k, _, v in rows if k in ("VmRSS", "VmHWM")}
print(json.dumps({"torch_imported": sys.modules.get("torch") is not None, **st}))
"""


def embedder_alone(models: dict[str, Path]) -> dict[str, dict]:
    """Each model alone in a fresh process (ORT ones with torch blocked): the floor of a server's memory."""
    out = {}
    for name, model in models.items():
        mode = "torch" if name.startswith("torch") else "block"
        r = subprocess.run([sys.executable, "-c", ALONE, str(model), mode], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"{name} alone failed: {r.stderr[-2000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        out[name] = {"torch_imported": got["torch_imported"], "rss_mb": round(got["VmRSS"] / 1024, 1),
                     "peak_rss_mb": round(got["VmHWM"] / 1024, 1)}  # fmt: skip
        print(f"  {name} alone ({'torch blocked' if mode == 'block' else 'torch'}): {out[name]}", flush=True)
    return out


def cli(*args: str) -> None:
    """``mmfusion ARGS`` in a subprocess, as a user runs it; its output is shown only when it fails."""
    r = subprocess.run([sys.executable, "-m", "mmfusion.cli.main", "-q", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"mmfusion {' '.join(args)} failed ({r.returncode}): {(r.stdout + r.stderr)[-3000:]}")


def prepare(preset: str, fresh: bool) -> dict[str, Path]:
    """The three models of one preset: checkpoint, ONNX export, int8 dynamic (made once, then reused)."""
    ckpt = make_model(preset, Path("runs/bench-serve") / preset)
    onnx, int8 = ROOT / f"{preset}-onnx", ROOT / f"{preset}-int8"
    if fresh or not (onnx / "export.json").is_file():
        cli("export", "onnx", "--model", str(ckpt), "--out", str(onnx))
    if fresh or not (int8 / "export.json").is_file():
        cli("quantize", "--model", str(onnx), "--out", str(int8), "--mode", "dynamic", "--verify", "shapes",
            "--max-drop", "1", "--n", "200")  # fmt: skip
    return dict(zip(BACKENDS, (ckpt, onnx, int8), strict=True))


def image_urls(n: int = 64) -> list[str]:
    from mmfusion.data.shapes import ShapesWorld

    world = ShapesWorld()
    out = []
    for i in range(n):
        buf = io.BytesIO()
        world.sample("test", i).image.save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def maps_torch(pid: int) -> bool:
    """Whether the process has mapped libtorch (imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


class Server:
    """One ``mmfusion serve`` subprocess and what its clients saw, per modality."""

    def __init__(self, name: str, model: Path, threads: int, log: Path):
        self.name, self.model = name, model
        self.port = free_port()
        cmd = [sys.executable, "-c", LAUNCH, "-q", "serve", "--model", str(model), "--port", str(self.port),
               "--max-concurrency", "1024"]  # fmt: skip
        env = {**os.environ, "MMFUSION_TEXT_CACHE_SIZE": "0", "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "BENCH_ORT_THREADS": str(threads)}  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        self.results: dict[str, dict] = {}
        self.memory: dict[str, float] = {}

    def wait(self) -> None:
        wait_until_serving(self.proc, self.port, self.log.read_text)
        status = proc_status(self.proc.pid)
        self.memory["rss_loaded_mb"] = status["VmRSS"] / 1024
        self.memory["threads_at_rest"] = status["Threads"]
        self.memory["torch_loaded"] = maps_torch(self.proc.pid)

    def add(self, modality: str, r: dict) -> None:
        acc = self.results.setdefault(modality, {"latencies": [], "failures": [], "seconds": 0.0})
        acc["latencies"] += r["latencies"]
        acc["failures"] += r["failures"]
        acc["seconds"] += r["seconds"]

    def peak(self, label: str) -> None:
        self.memory[f"peak_rss_after_{label}_mb"] = proc_status(self.proc.pid)["VmHWM"] / 1024

    def report(self) -> dict:
        out: dict = {"model": str(self.model)}
        out |= {k: v if isinstance(v, bool) else round(v, 1) for k, v in self.memory.items()}
        for modality, acc in self.results.items():
            lat, n = sorted(acc["latencies"]), len(acc["latencies"])
            out[modality] = {
                "requests": n,
                "errors": len(acc["failures"]),
                "error_samples": sorted(set(acc["failures"]))[:5],
                "seconds": round(acc["seconds"], 2),
                "requests_per_s": round(n / acc["seconds"], 1),
                "p50_ms": round(1000 * statistics.median(lat), 1) if lat else float("nan"),
                "p99_ms": round(1000 * lat[min(n - 1, int(0.99 * n))], 1) if lat else float("nan"),
            }
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def load(port: int, clients: int, seconds: float, body, dim: int, start: int) -> dict:
    """``clients`` closed-loop clients for ``seconds``; request ``k`` sends ``body(k)``; a reply is good when it is
    200 with one ``dim``-wide base64 embedding."""

    def one_embedding(reply: bytes) -> bool:
        items = json.loads(reply)["data"]
        return len(items) == 1 and len(base64.b64decode(items[0]["embedding"])) == 4 * dim

    return await closed_loop(port, clients, seconds, lambda k: ("/v1/embeddings", body(k), one_embedding), start)


def bodies(texts: list[str], urls: list[str]) -> dict:
    def text(k: int) -> bytes:
        return json.dumps({"input": f"{texts[k % len(texts)]} #{k}", "encoding_format": "base64"}).encode()

    def image(k: int) -> bytes:
        return json.dumps({"input": urls[k % len(urls)], "modality": "image", "encoding_format": "base64"}).encode()

    return {"texts": text, "images": image}


def bench_preset(preset: str, args, texts: list[str], urls: list[str]) -> dict:
    t0 = time.perf_counter()
    models = prepare(preset, args.fresh)
    prep_s = time.perf_counter() - t0
    dim = json.loads((models["ORT fp32"] / "export.json").read_text())["embed_dim"]
    make = bodies(texts, urls)
    servers = [Server(name, m, args.threads, ROOT / f"{preset}-{name.replace(' ', '-')}.log")
               for name, m in models.items()]  # fmt: skip
    try:
        for s in servers:
            s.wait()
        counter = 10**6
        for modality in ("texts", "images"):
            for s in servers:  # warm-up, not counted
                asyncio.run(load(s.port, 4, 2, make[modality], dim, start=9 * 10**6))
            for r in range(args.rounds):
                for s in servers if r % 2 == 0 else servers[::-1]:
                    out = asyncio.run(load(s.port, args.clients, args.seconds / args.rounds, make[modality], dim,
                                           start=counter))  # fmt: skip
                    counter = out["next"]
                    s.add(modality, out)
            for s in servers:
                s.peak(modality)
        reports = {s.name: s.report() for s in servers}
    finally:
        for s in servers:
            s.stop()
    base = reports["torch fp32"]
    for name, r in reports.items():
        r["x torch"] = {
            f"{m} req/s": round(r[m]["requests_per_s"] / base[m]["requests_per_s"], 2) for m in ("texts", "images")
        } | {f"{m} p99": round(r[m]["p99_ms"] / base[m]["p99_ms"], 2) for m in ("texts", "images")}
        r["x torch"]["peak RSS"] = round(r["peak_rss_after_images_mb"] / base["peak_rss_after_images_mb"], 2)
        print(f"{preset} {name}: " + "; ".join(
            f"{m} {r[m]['requests_per_s']} req/s, p50 {r[m]['p50_ms']} ms, p99 {r[m]['p99_ms']} ms, "
            f"{r[m]['errors']} errors {r[m]['error_samples'] or ''}" for m in ("texts", "images"))
            + f"; RSS loaded {r['rss_loaded_mb']} MB, peak {r['peak_rss_after_texts_mb']} MB (texts), "
              f"{r['peak_rss_after_images_mb']} MB (images); torch loaded: {r['torch_loaded']}; "
              f"x torch {r['x torch']}", flush=True)  # fmt: skip
    return {"prepare_s": round(prep_s, 1), "servers": reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="clip-tiny,vit-b-32")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15, help="load time per server and modality (all rounds)")
    ap.add_argument("--rounds", type=int, default=2, help="the servers take turns this many times per modality")
    ap.add_argument("--threads", type=int, default=1, help="torch's and ONNX Runtime's intra-op threads, every server")
    ap.add_argument("--fresh", action="store_true", help="export and quantise again")
    ap.add_argument("--alone", action="store_true",
                    help="instead of serving: each model alone in a fresh process (the ORT ones with torch blocked), "
                         "its resident memory after embedding 32 texts and 32 images")  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    if args.alone:
        alone = {}
        for preset in args.models.split(","):
            print(preset, flush=True)
            alone[preset] = embedder_alone(prepare(preset, args.fresh))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"date": date.today().isoformat(), "alone": alone}, indent=2))
        return
    texts, urls = captions(), image_urls()
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds, "threads": args.threads,
            "max_batch_size": 32, "max_wait_ms": 5.0, "loadavg_start": os.getloadavg()}  # fmt: skip
    results = {}
    t0 = time.perf_counter()
    for preset in args.models.split(","):
        results[preset] = bench_preset(preset, args, texts, urls)
    meta["loadavg_end"] = os.getloadavg()
    meta["seconds_total"] = round(time.perf_counter() - t0)
    print(json.dumps({"load_1min_start_end": [meta["loadavg_start"][0], meta["loadavg_end"][0]],
                      "seconds_total": meta["seconds_total"]}))  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta | {"results": results}, indent=2))


if __name__ == "__main__":
    main()
