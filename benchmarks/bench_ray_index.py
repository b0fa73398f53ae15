"""Indexing through Ray against the plain indexer on this machine, and how many actors one writer absorbs.

1. **Throughput**, side by side, alternating ``--repeats`` times: ``Index.update`` in this process against
   ``ray=RayOptions()`` (a local Ray of all this machine's CPUs, one actor per CPU; ``ray.init`` itself is
   timed apart) into fresh indexes of the same folder of 1024x768 JPEGs, for the ViT-B/32 geometry (the model
   is the bottleneck) and clip-tiny (decoding is). A Ray run has a fixed cost (starting the actors' processes,
   importing torch there, shipping the model) and a steady rate; a third run on 8 photos measures the fixed
   cost, and the steady rate is ``(n - 8) / (T(n) - T(8))``. Medians over the repeats.
2. **Scaling model**: one actor's steady images/s (the steady rate over the actors) and the single writer's
   commit rate (rows/s through the indexer's chunked SQLite + FAISS writer, vectors of the model's width). One
   writer keeps up with ``commit rate / per-actor rate`` actors; past that the writer is the bottleneck.

    python benchmarks/bench_ray_index.py                         # about 10 minutes on 2 cores
    python benchmarks/bench_ray_index.py --vit-photos 64 --tiny-photos 300 --repeats 1 --json runs/bench-ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_index_build's helpers, tests.utils

from bench_index_build import make_photos, save_model  # noqa: E402
from mmfusion.index import Index  # noqa: E402
from mmfusion.index.ray_embed import RayOptions, import_ray  # noqa: E402


def index_run(folder: Path, model_dir: Path, db: Path, batch: int, ray: RayOptions | None) -> float:
    """Seconds of one fresh indexing run (the model loaded before the clock starts)."""
    shutil.rmtree(db, ignore_errors=True)
    with Index.open(db, model=model_dir, write=True) as ix:
        t0 = time.perf_counter()
        report = ix.update([folder], batch_size=batch, progress=False, ray=ray)
        elapsed = time.perf_counter() - t0
    assert report.added + report.duplicates == len(list(folder.glob("*.jpg"))), report.summary()[:3]
    return elapsed


def commit_rate(dim: int, rows: int, work: Path) -> float:
    """Rows/s the single writer commits (SQLite transactions of 256 rows, then FAISS), vectors of width ``dim``."""
    from mmfusion.index.ann import VectorIndex
    from mmfusion.index.decode import Decoded
    from mmfusion.index.scan import FileEntry
    from mmfusion.index.store import Store
    from mmfusion.index.writer import ChunkWriter, IndexReport

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store, vi = Store(work), VectorIndex(dim)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    writer = ChunkWriter(store, vi, IndexReport(), 256, 10.0, 1e9, lambda: None)
    t0 = time.perf_counter()
    for i in range(rows):
        f = FileEntry(f"/photos/{i // 1000:04d}/img{i:07d}.jpg", "/photos", 200_000, 1_700_000_000_000_000_000 + i)
        writer.add(f, Decoded(rng.bytes(16), None, 1024, 768, "JPEG", None), vecs[i])
        writer.maybe_commit()
    writer.flush()
    rate = rows / (time.perf_counter() - t0)
    store.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-ray", help="where photos, models and indexes go")
    ap.add_argument("--vit-photos", type=int, default=400, help="1024x768 JPEGs indexed with the ViT-B/32 geometry")
    ap.add_argument("--tiny-photos", type=int, default=3000, help="1024x768 JPEGs indexed with clip-tiny")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each way")
    ap.add_argument("--commit-rows", type=int, default=50_000, help="rows for the writer's commit rate")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ray = import_ray()
    work = Path(args.work)
    photos = make_photos(work / "photos", max(args.vit_photos, args.tiny_photos), size=(1024, 768))
    cpus = os.cpu_count() or 1
    results: dict = {"date": str(date.today()), "machine": f"{platform.machine()}, {cpus} CPUs"}
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results["ray.init s"] = round(time.perf_counter() - t0, 2)
    print(f"ray.init: {results['ray.init s']} s", flush=True)
    for preset, batch, dim, n in (("vit-b-32", 32, 512, args.vit_photos), ("clip-tiny", 64, 128, args.tiny_photos)):
        model_dir = save_model(preset, work / f"model-{preset}")
        folders = {}
        for size in (n, 8):
            folders[size] = work / f"set-{size}"
            if not folders[size].is_dir() or len(list(folders[size].iterdir())) != size:
                shutil.rmtree(folders[size], ignore_errors=True)
                folders[size].mkdir(parents=True)
                for p in photos[:size]:
                    os.link(p, folders[size] / p.name)  # the same files (the indexer skips outside links)
        runs: dict[str, list[float]] = {"plain": [], "ray": [], "ray fixed s": [], "ray steady": []}
        for _ in range(args.repeats):
            runs["plain"].append(n / index_run(folders[n], model_dir, work / "db", batch, None))
            t_n = index_run(folders[n], model_dir, work / "db", batch, RayOptions())
            t_8 = index_run(folders[8], model_dir, work / "db", batch, RayOptions())
            runs["ray"].append(n / t_n)
            runs["ray steady"].append((n - 8) / max(t_n - t_8, 1e-9))
            runs["ray fixed s"].append(t_8 - 8 / runs["ray steady"][-1])
        row = {"photos": n, **{k: round(statistics.median(v), 2) for k, v in runs.items()}}
        row["ray / plain"] = round(row["ray"] / row["plain"], 3)
        row["ray steady / plain"] = round(row["ray steady"] / row["plain"], 3)
        row["per actor"] = round(row["ray steady"] / cpus, 2)
        row["writer rows/s"] = round(commit_rate(dim, args.commit_rows, work / "commit"))
        row["actors one writer absorbs"] = int(row["writer rows/s"] // row["per actor"])
        results[preset] = row
        print(preset, json.dumps(row), flush=True)
    ray.shutdown()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
