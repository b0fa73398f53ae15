"""Vectors in Milvus (milvus-lite) against FAISS, side by side, through the index's one vector-store interface.

The same clustered unit vectors as ``bench_index_search.py`` (stand-ins for 512-d ViT-B/32 image embeddings),
inserted into each store the index can use, then searched with fresh queries of the same mixture:

- FAISS flat: ``VectorIndex`` kept exact (``IndexIDMap2(IndexFlatIP)``);
- FAISS IVF: ``VectorIndex`` in the layout the index picks at this size (from 100,000 vectors: IVF over 8-bit
  codes with exact re-ranking, nprobe tuned at build), when ``--n`` reaches it;
- Milvus: ``MilvusVectors`` on a milvus-lite file (FLAT, IP), the client code a Milvus server runs too, and
  HNSW when milvus-lite accepts it.

Per store: insert time (FAISS: adding, and training the IVF; Milvus: upserts, a flush and its index build),
single-query p50/p99, batch-of-32 throughput, filtered search p50 (an ``allowed`` set of 1,000 ids, as a path
filter gives), and recall@10 against exact search. milvus-lite 3 is pure Python: a gRPC server on a thread of
this process (FAISS inside for HNSW and IVF), so its figures carry the client's real RPC and serialisation
costs, plus Python's and the GIL's, but say little about a Milvus server's engine (C++, on its own cores).

    python benchmarks/bench_milvus.py                       # 100,000 x 512, a few minutes
    python benchmarks/bench_milvus.py --n 20000 --json runs/bench-milvus.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_index_search import clustered, recall_at  # noqa: E402


def timed_queries(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query times (ms) and (Q, k) ids, one query at a time."""
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids.append(search(q[None], k)[1][0])
        times.append((time.perf_counter() - t0) * 1000)
    return np.asarray(times), np.stack(ids)


def measure(name: str, store, queries: np.ndarray, truth: np.ndarray, allowed, k: int, args) -> dict:
    """Latency, throughput and recall of one store (already filled)."""
    for q in queries[:5]:  # warm-up: first searches load segments and caches
        store.search(q[None], k)
    single, got = timed_queries(store.search, queries[: args.single], k)
    batches = [queries[s : s + 32] for s in range(0, min(len(queries), args.batches * 32), 32)]
    t0 = time.perf_counter()
    batch_ids = [store.search(b, k)[1] for b in batches]
    t_batch = time.perf_counter() - t0
    n = sum(len(b) for b in batches)
    filtered, _ = timed_queries(lambda q, k: store.search(q, k, allowed), queries[: args.single // 2], k)
    return {
        "store": name,
        "kind": store.kind,
        "p50_ms": float(np.percentile(single, 50)),
        "p99_ms": float(np.percentile(single, 99)),
        "batch32_qps": float(n / t_batch),
        "batch32_ms": float(t_batch / len(batches) * 1000),
        "filtered_p50_ms": float(np.percentile(filtered, 50)),
        "recall@10": recall_at(np.concatenate([got, *batch_ids]), np.concatenate([truth[: len(got)], truth[:n]]), k),
    }


def fill_faiss(vi, ids: np.ndarray, db: np.ndarray) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(ids), 20_000):
        vi.add(ids[s : s + 20_000], db[s : s + 20_000])
    if vi.needs_rebuild():
        vi.rebuild()
    return time.perf_counter() - t0


def fill_milvus(mv, ids: np.ndarray, db: np.ndarray) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(ids), 20_000):
        mv.add(ids[s : s + 20_000], db[s : s + 20_000])
    mv.client.flush(mv.name)  # seal the segments, then wait for their index to be built
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        info = mv.client.describe_index(mv.name, "vector")
        if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= len(ids):
            break
        time.sleep(0.5)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    ap.add_argument("--dim", type=int, default=512, help="vector width (ViT-B/32: 512)")
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000, help="queries generated (single + batches use them)")
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--batches", type=int, default=20, help="batches of 32 timed")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-hnsw", action="store_true", help="skip milvus-lite HNSW")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import faiss

    from mmfusion.index.ann import AnnConfig, VectorIndex
    from mmfusion.index.milvus import MilvusVectors

    rng = np.random.default_rng(0)
    k = args.k
    print(f"generating {args.n:,} x {args.dim} clustered vectors...", flush=True)
    db, centres = clustered(args.n, args.dim, args.clusters, 1.0, rng)
    queries, _ = clustered(args.queries, args.dim, args.clusters, 1.0, rng, centres)
    ids = np.arange(args.n, dtype=np.int64) * 7 + 3  # stable ids need not be positions
    allowed = np.sort(rng.choice(ids, size=min(1000, args.n), replace=False))
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(db)
    truth = ids[exact.search(queries, k)[1]]

    rows, inserts = [], {}

    def run(name, make, fill):
        store = make()
        try:
            inserts[name] = fill(store, ids, db)
            r = measure(name, store, queries, truth, allowed, k, args) | {"insert_s": inserts[name]}
        finally:
            store.close()
        rows.append(r)
        print(
            f"{name:22s} insert {r['insert_s']:7.1f}s  p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms  "
            f"batch32 {r['batch32_qps']:9.0f} q/s  filtered p50 {r['filtered_p50_ms']:8.3f} ms  "
            f"recall@10 {r['recall@10']:.3f}",
            flush=True,
        )

    run("FAISS flat", lambda: VectorIndex(args.dim, AnnConfig(ivf_threshold=10**12)), fill_faiss)
    if args.n >= AnnConfig().ivf_threshold:
        run("FAISS IVF (index's)", lambda: VectorIndex(args.dim, AnnConfig()), fill_faiss)
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        lite = str(Path(tmp) / "vectors.db")
        run("Milvus-lite FLAT", lambda: MilvusVectors(lite, "flat", args.dim, "bench", True, index_type="FLAT"),
            fill_milvus)  # fmt: skip
        if not args.no_hnsw:
            try:
                run("Milvus-lite HNSW", lambda: MilvusVectors(lite, "hnsw", args.dim, "bench", True, index_type="HNSW"),
                    fill_milvus)  # fmt: skip
            except Exception as e:  # milvus-lite builds may not offer HNSW
                print(f"Milvus-lite HNSW: not run ({str(e).splitlines()[0][:160]})", flush=True)

    print()
    print(f"{args.n:,} x {args.dim}, k={k}, {args.single} single queries, {args.batches} batches of 32")
    head = f"| {'store':22s} | insert s | p50 ms | p99 ms | batch-32 q/s | filtered p50 ms | recall@10 |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['store']:22s} | {r['insert_s']:8.1f} | {r['p50_ms']:6.2f} | {r['p99_ms']:6.2f} | "
            f"{r['batch32_qps']:12.0f} | {r['filtered_p50_ms']:15.2f} | {r['recall@10']:9.3f} |"
        )
    out = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} threads",
        "n": args.n,
        "dim": args.dim,
        "k": k,
        "results": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
