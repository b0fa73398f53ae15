"""Search latency of the image index's vector structure at a million vectors, against the simple ways.

Random-but-clustered unit vectors (Gaussian clusters around random centres) stand in for image
embeddings; queries are fresh points of the same mixture. One run measures, side by side:

- mmfusion's ``VectorIndex`` in the layout the index picks at this size (IVF over 8-bit codes with exact
  re-ranking, nprobe tuned when built): single-query p50/p99 latency and recall@10 against exact search,
  plus the time and memory to build it;
- exact FAISS search (``IndexFlatIP``), NumPy brute force (one matrix-vector product + argpartition),
  and the naive baseline: a Python loop over a dict of vectors (timed on a few queries only).

    python benchmarks/bench_index_search.py                 # 1,000,000 x 512, about 5 minutes
    python benchmarks/bench_index_search.py --n 200000 --json runs/bench-index-search.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np


def clustered(n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator, centres=None, sub: int = 16):
    """Unit vectors like embeddings: each cluster varies mostly within its own ``sub``-dimensional subspace
    (low intrinsic dimension), plus a little isotropic noise. Returns (vectors, (centres, bases))."""
    if centres is None:
        c = rng.standard_normal((clusters, dim)).astype(np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        bases = rng.standard_normal((clusters, sub, dim)).astype(np.float32) / np.sqrt(dim)
        centres = (c, bases)
    c, bases = centres
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        which = rng.integers(len(c), size=m)
        z = spread * rng.standard_normal((m, 1, sub)).astype(np.float32) / np.sqrt(sub)
        x = c[which] + (z @ bases[which])[:, 0] + 0.2 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def single_query_latency(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query times (ms) and (Q, k) ids, one query at a time."""
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        got = search(q, k)
        times.append((time.perf_counter() - t0) * 1000)
        ids.append(got)
    return np.asarray(times), np.stack(ids)


def recall_at(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(g[:k]) & set(t[:k])) / k for g, t in zip(got, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=100, help="clusters (each spans many IVF lists)")
    ap.add_argument("--spread", type=float, default=1.0, help="spread of a cluster in its subspace (centre norm 1)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--loop-queries", type=int, default=3, help="queries timed for the Python-loop baseline")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import faiss

    from mmfusion.index.ann import AnnConfig, VectorIndex

    rng = np.random.default_rng(0)
    k = args.k
    print(f"generating {args.n:,} x {args.dim} clustered vectors ({args.clusters} clusters, 16-d each)...", flush=True)
    db, centres = clustered(args.n, args.dim, args.clusters, args.spread, rng)
    queries, _ = clustered(args.queries, args.dim, args.clusters, args.spread, rng, centres)
    ids = np.arange(args.n, dtype=np.int64) * 7 + 3  # stable ids need not be positions

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(db)
    _, truth_pos = exact.search(queries, k)
    truth = ids[truth_pos]

    rss0 = rss_mib()
    t0 = time.perf_counter()
    vi = VectorIndex(args.dim, AnnConfig())
    for s in range(0, args.n, 100_000):
        vi.add(ids[s : s + 100_000], db[s : s + 100_000])
    t_add = time.perf_counter() - t0
    vi.rebuild()
    t_build = time.perf_counter() - t0
    mem = rss_mib() - rss0
    print(f"built {vi.kind} in {t_build:.1f}s (adding {t_add:.1f}s), +{mem:,.0f} MiB", flush=True)

    rows = {}

    def report(name, times, got):
        r = {
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(times.mean()),
            "recall@10": recall_at(got, truth[: len(got)], k),
            "queries": len(times),
        }
        rows[name] = r
        print(
            f"{name:34s} p50 {r['p50_ms']:9.3f} ms  p99 {r['p99_ms']:9.3f} ms  recall@10 {r['recall@10']:.3f}",
            flush=True,
        )

    t, got = single_query_latency(lambda q, k: vi.search(q[None], k)[1][0], queries, k)
    report("mmfusion VectorIndex (" + vi.kind.split(" ")[0] + ")", t, got)
    t, got = single_query_latency(lambda q, k: ids[exact.search(q[None], k)[1][0]], queries[:200], k)
    report("FAISS exact (IndexFlatIP)", t, got)

    def numpy_search(q, k):
        s = db @ q
        top = np.argpartition(-s, k)[:k]
        return ids[top[np.argsort(-s[top])]]

    t, got = single_query_latency(numpy_search, queries[:100], k)
    report("NumPy brute force", t, got)
    table = {int(i): v for i, v in zip(ids, db)}

    def python_loop(q, k):
        scores = [(float(np.dot(v, q)), i) for i, v in table.items()]
        scores.sort(reverse=True)
        return np.asarray([i for _, i in scores[:k]])

    t, got = single_query_latency(python_loop, queries[: args.loop_queries], k)
    report("Python loop over a dict", t, got)
    base = rows["FAISS exact (IndexFlatIP)"]["p50_ms"]
    ours = next(v for n, v in rows.items() if n.startswith("mmfusion"))["p50_ms"]
    print(
        f"speed-up of p50 over exact FAISS: {base / ours:.1f}x; over the Python loop: "
        f"{rows['Python loop over a dict']['p50_ms'] / ours:,.0f}x"
    )
    out = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} threads",
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "layout": vi.kind,
        "build_s": t_build,
        "add_s": t_add,
        "build_mem_mib": mem,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
