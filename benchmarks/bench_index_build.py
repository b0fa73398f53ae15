"""Indexing speed: decoding big photos, end-to-end indexing against the model's own speed, and re-runs.

Three measurements, each side by side in one run:

1. Decode + preprocess throughput on generated 3000x2000 JPEG photos, with libjpeg's reduced-scale
   (DCT) decoding as the index uses it, against full-size decoding (one thread, same files).
2. End-to-end indexing (scan, read, hash, decode in worker threads, embed, commit) in images/s, against
   the model's encode throughput on tensors that are already preprocessed (the ceiling), for the
   ViT-B/32 geometry (the model is the bottleneck) and for clip-tiny (decoding is).
3. Re-running the indexer on an unchanged folder of 10,000 images: seconds, and model calls (must be 0).

    python benchmarks/bench_index_build.py                        # about 10 minutes on 2 cores
    python benchmarks/bench_index_build.py --photos 200 --rerun-files 2000 --json runs/bench-index-build.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.utils for the tiny tokenizer


def make_photos(folder: Path, n: int, size=(3000, 2000)) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields with texture), generated once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = folder / f"photo{i:05d}.jpg"
        if not p.exists():
            base = Image.fromarray(rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            noise = rng.integers(-12, 12, (size[1] // 4, size[0] // 4, 3))
            tex = Image.fromarray(np.clip(128 + noise, 0, 255).astype(np.uint8)).resize(size, Image.NEAREST)
            Image.blend(base, tex, 0.15).save(p, quality=90)
        paths.append(p)
    return paths


def make_small(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        p = folder / f"{i // 1000:02d}" / f"img{i:05d}.png"
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (2, 2, 3), dtype=np.uint8)).resize((32, 32)).save(p)


def save_model(preset: str, path: Path) -> Path:
    if not (path / "model.safetensors").exists():
        from tests.utils import shapes_tokenizer

        from mmfusion.models import create_model, save_model

        torch.manual_seed(0)
        ctx = 77 if preset == "vit-b-32" else 32
        save_model(create_model(preset, shapes_tokenizer(context_length=ctx, scenes=100)), path)
    return path


def decode_throughput(paths: list[Path], size: int, draft: bool) -> float:
    from mmfusion.index.decode import decode_file

    t0 = time.perf_counter()
    for p in paths:
        decode_file(str(p), size, draft=draft)
    return len(paths) / (time.perf_counter() - t0)


def encode_throughput(model, n: int, batch: int) -> float:
    """Images/s of model.encode_image on preprocessed tensors (after one warm-up batch)."""
    size = model.transform.size
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model.encode_image(x)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model.encode_image(x)
            done += batch
    return done / (time.perf_counter() - t0)


def index_run(folder: Path, model_dir: Path, db: Path, batch: int, workers: int | None = None) -> tuple[float, object]:
    from mmfusion.index import Index

    shutil.rmtree(db, ignore_errors=True)
    t0 = time.perf_counter()
    with Index.open(db, model=model_dir, write=True) as ix:
        report = ix.update([folder], batch_size=batch, workers=workers, progress=False)
    return time.perf_counter() - t0, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-index", help="where photos, models and indexes go")
    ap.add_argument("--photos", type=int, default=2000, help="3000x2000 JPEGs to index")
    ap.add_argument("--decode-sample", type=int, default=100, help="photos timed for decoding, each way")
    ap.add_argument("--rerun-files", type=int, default=10_000, help="small images for the re-run test")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(args.work)
    print(f"generating {args.photos} photos of 3000x2000 (once; kept in {work})...", flush=True)
    photos = make_photos(work / "photos", args.photos)
    results: dict = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}

    sample = photos[: args.decode_sample]
    decode_throughput(sample[:5], 224, True)  # warm the file cache
    for size in (224, 64):
        fast = decode_throughput(sample, size, True)
        full = decode_throughput(sample, size, False)
        results[f"decode_{size}px"] = {"reduced_scale_img_s": fast, "full_img_s": full, "speedup": fast / full}
        print(
            f"decode+preprocess to {size}px, 1 thread: reduced-scale {fast:.1f} img/s, "
            f"full {full:.1f} img/s = {fast / full:.1f}x",
            flush=True,
        )

    for preset, batch in (("vit-b-32", 32), ("clip-tiny", 128)):
        model_dir = save_model(preset, work / f"model-{preset}")
        import mmfusion

        model = mmfusion.load(model_dir)
        n = 512 if preset == "vit-b-32" else 8192
        enc = encode_throughput(model, n, batch)
        secs, report = index_run(work / "photos", model_dir, work / f"db-{preset}", batch)
        enc = max(enc, encode_throughput(model, n, batch))  # the better of before and after: the ceiling
        del model
        e2e = report.model_calls / secs
        results[f"index_{preset}"] = {
            "images": report.model_calls,
            "seconds": secs,
            "end_to_end_img_s": e2e,
            "encode_only_img_s": enc,
            "ratio": e2e / enc,
        }
        print(
            f"{preset}: indexed {report.model_calls} photos in {secs:.1f}s = {e2e:.1f} img/s end to end; "
            f"encoding preprocessed tensors {enc:.1f} img/s; ratio {e2e / enc:.2f}",
            flush=True,
        )
        if preset == "clip-tiny":  # decoding is the bottleneck here: every core decoding
            secs_all, rep_all = index_run(work / "photos", model_dir, work / f"db-{preset}", batch, os.cpu_count())
            results[f"index_{preset}"]["end_to_end_all_workers_img_s"] = rep_all.model_calls / secs_all
            print(
                f"{preset} with {os.cpu_count()} decoding threads: {rep_all.model_calls / secs_all:.1f} img/s",
                flush=True,
            )

    small = work / "small"
    make_small(small, args.rerun_files)
    tiny = save_model("clip-tiny", work / "model-clip-tiny")
    secs, first = index_run(small, tiny, work / "db-small", 256)
    from mmfusion.index import Index

    t0 = time.perf_counter()
    with Index.open(work / "db-small", write=True) as ix:
        again = ix.update([small], progress=False)
    rerun = time.perf_counter() - t0
    results["rerun_unchanged"] = {
        "files": args.rerun_files,
        "first_run_s": secs,
        "rerun_s": rerun,
        "rerun_model_calls": again.model_calls,
        "unchanged": again.unchanged,
    }
    print(
        f"re-run on {args.rerun_files:,} unchanged files: {rerun:.2f}s (open + scan + save), "
        f"{again.model_calls} model calls (first run {secs:.1f}s)",
        flush=True,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
