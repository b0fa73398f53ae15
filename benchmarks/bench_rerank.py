"""What re-ranking the top K of a search costs per query, against the search itself.

An index of ``--images`` ShapesWorld test scenes (64 px PNGs) is built with the re-ranker's own CLIP; then for
``--queries`` test captions, one at a time as ``mmfusion search --rerank`` runs them: the first stage (the query's
text embedded, the index searched for K), and the re-ranking of those K (their index rows read, the files decoded
and encoded by the image tower unless cached, the head run) in two states: cold (the memory cache emptied before
each query: every candidate decoded and encoded) and warm (the same query again: every candidate cached). Medians
and 90th percentiles in milliseconds; the re-ranking is also split into its image part and its head.

With no ``--reranker``, an untrained one is built over ``--clip`` (speed does not depend on what was learned); a
captioner run as ``--reranker`` re-ranks an index built with ``--clip``.

Run: python benchmarks/bench_rerank.py [--clip runs/bench-compress/teacher] [--reranker runs/rerank/tiny-3m]
     [--k 20] [--images 300] [--queries 50] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from mmfusion.data.shapes import ShapesWorld
from mmfusion.index import Index
from mmfusion.index.rerank import SearchReranker, rerank_results
from mmfusion.models import load
from mmfusion.models.caption_ranker import as_reranker
from mmfusion.models.reranker import Reranker


def stats(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(xs), 2), "p90_ms": round(float(np.percentile(xs, 90)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="runs/bench-compress/teacher", help="the CLIP (with no --reranker)")
    ap.add_argument("--reranker", help="a trained re-ranker run (default: an untrained one over --clip)")
    ap.add_argument("--k", type=int, default=20, help="results re-ranked per query")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = as_reranker(load(args.reranker).eval()) if args.reranker else Reranker.from_clip(load(args.clip)).eval()
    clip = getattr(model, "clip", None) or load(args.clip)  # a captioner re-ranks over --clip's index
    world = ShapesWorld()
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for i in range(args.images):
            world.sample("test", i).image.save(photos / f"scene{i:04d}.png")
        with Index.open(Path(tmp) / "db", model=clip, write=True) as ix:
            ix.update([photos], progress=False)
        if args.threads:  # indexing plans its own threads: the searches run with the ones asked for
            torch.set_num_threads(args.threads)
        queries = [world.captions(world.scene("test", 10_000 + i))[0].text for i in range(args.queries)]
        times: dict[str, list[float]] = {k: [] for k in ("search", "cold", "cold_images", "cold_head", "warm")}
        with Index.open(Path(tmp) / "db", model=clip) as ix:
            scorer = SearchReranker(model)
            ix.search(queries[0], k=args.k)  # warm-up: model, FAISS, SQLite
            for q in queries:
                t0 = time.perf_counter()
                results = ix.search(q, k=args.k)
                t1 = time.perf_counter()
                scorer.clear()
                rerank_results(scorer, ix.store.get([r.id for r in results]), q, results)
                t2 = time.perf_counter()
                timing = scorer.last_timing
                rerank_results(scorer, ix.store.get([r.id for r in results]), q, results)
                t3 = time.perf_counter()
                for name, v in (("search", t1 - t0), ("cold", t2 - t1), ("warm", t3 - t2)):
                    times[name].append(v * 1000)
                times["cold_images"].append(timing["images_ms"])
                times["cold_head"].append(timing["head_ms"])
    result = {
        "date": str(date.today()),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "reranker": args.reranker or f"untrained over {args.clip}",
        "k": args.k,
        "images": args.images,
        "queries": args.queries,
        **{name: stats(v) for name, v in times.items()},
    }
    print(f"re-ranking the top {args.k} of {args.images} images, {args.queries} queries, "
          f"{result['torch_threads']} torch threads (ms per query, median / p90)")  # fmt: skip
    for name, label in (("search", "first stage (text embedded, index searched)"),
                        ("cold", "re-rank, cold: decode + encode K images + head"),
                        ("cold_images", "  of which decoding and encoding the images"),
                        ("cold_head", "  of which the head"),
                        ("warm", "re-rank, warm: K memories cached, head only")):  # fmt: skip
        print(f"  {label:48s} {result[name]['median_ms']:8.2f} / {result[name]['p90_ms']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
