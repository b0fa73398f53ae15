"""Indexing through Ray against the plain indexer on this machine, and how many actors one writer absorbs.

1. **Throughput**, side by side, alternating ``--repeats`` times: ``Index.update`` in this process against
   ``ray=RayOptions()`` (a local Ray of all this machine's CPUs, already started: its start-up is timed apart)
   into fresh indexes of the same folder of 1024x768 JPEGs, for the ViT-B/32 geometry (the model is the
   bottleneck) and clip-tiny (decoding is). Images/s is the median over the repeats; the ratio is Ray's share of
   the plain indexer's speed.
2. **Scaling model**: one actor's images/s (from a Ray run with one actor of one CPU) and the single writer's
   commit rate (rows/s through the indexer's chunked SQLite + FAISS writer, vectors of the model's width). One
   writer keeps up with ``commit rate / per-actor rate`` actors; past that the writer is the bottleneck.

    python benchmarks/bench_ray_index.py                         # about 6 minutes on 2 cores
    python benchmarks/bench_ray_index.py --photos 300 --repeats 1 --json runs/bench-ray.json
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
    """Images/s of one fresh indexing run (the model loaded before the clock starts)."""
    shutil.rmtree(db, ignore_errors=True)
    with Index.open(db, model=model_dir, write=True) as ix:
        t0 = time.perf_counter()
        report = ix.update([folder], batch_size=batch, progress=False, ray=ray)
        elapsed = time.perf_counter() - t0
    assert report.added + report.duplicates == len(list(folder.glob("*.jpg"))), report
    return (report.added + report.duplicates) / elapsed


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
    ap.add_argument("--photos", type=int, default=600, help="1024x768 JPEGs to index")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each way")
    ap.add_argument("--commit-rows", type=int, default=50_000, help="rows for the writer's commit rate")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ray = import_ray()
    work = Path(args.work)
    folder = work / "photos"
    make_photos(folder, args.photos, size=(1024, 768))
    cpus = os.cpu_count() or 1
    results: dict = {"date": str(date.today()), "machine": f"{platform.machine()}, {cpus} CPUs", "photos": args.photos}
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results["ray_start_s"] = round(time.perf_counter() - t0, 2)
    print(f"ray.init: {results['ray_start_s']} s", flush=True)
    for preset, batch, dim in (("vit-b-32", 32, 512), ("clip-tiny", 64, 128)):
        model_dir = save_model(preset, work / f"model-{preset}")
        runs: dict[str, list[float]] = {"plain": [], "ray": [], "ray, 1 actor": []}
        for _ in range(args.repeats):
            runs["plain"].append(index_run(folder, model_dir, work / "db", batch, None))
            runs["ray"].append(index_run(folder, model_dir, work / "db", batch, RayOptions()))
            runs["ray, 1 actor"].append(index_run(folder, model_dir, work / "db", batch, RayOptions(actors=1)))
        row = {k: round(statistics.median(v), 1) for k, v in runs.items()}
        row["ray / plain"] = round(row["ray"] / row["plain"], 3)
        row["per actor (1 CPU)"] = row["ray, 1 actor"]
        row["writer rows/s"] = round(commit_rate(dim, args.commit_rows, work / "commit"))
        row["actors one writer absorbs"] = int(row["writer rows/s"] // row["per actor (1 CPU)"])
        results[preset] = row
        print(preset, json.dumps(row), flush=True)
    ray.shutdown()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
