"""Vectors keyed by stable ids in FAISS: exact inner product while small, IVF with exact re-ranking past a size.

The store under the index (SQLite) keeps every vector too, so this structure is a cache that can always be
rebuilt or repaired from it. Two layouts:

- ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact, with add/remove by id. Used below ``ivf_threshold`` vectors.
- ``ivf``: an inverted file over 8-bit scalar-quantised vectors (``IndexIVFScalarQuantizer``) finds
  candidates fast and with a quarter of the memory traffic; the candidates are then re-scored exactly
  against the float vectors kept in a flat ``IndexIDMap2`` (re-ranking), so the scores returned are
  exact inner products. ``nprobe`` is tuned when the layout is built, to the smallest value whose
  recall@10 against exact search reaches ``target_recall`` on sample queries.

Vectors are L2-normalised by the callers, so inner product is cosine similarity.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from ..utils.io import atomic_write

log = logging.getLogger(__name__)


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each build it tries at INFO
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in the [index] extra
        raise ImportError("the image index needs FAISS: pip install 'mmfusion[index]' (faiss-cpu)") from e
    return faiss


@dataclass
class AnnConfig:
    """When and how the index turns approximate."""

    ivf_threshold: int = 100_000  # exact search below this many vectors
    target_recall: float = 0.97  # tuned recall@10 of the approximate layout (the promise is >= 0.95)
    rerank_factor: int = 4  # candidates re-scored exactly: rerank_factor * k (at least 40)
    rebuild_growth: float = 4.0  # re-train the IVF when the collection has grown this much since training


def _as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (N, {dim}), got {x.shape}")
    return x


def _as_ids(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class VectorIndex:
    """Inner-product search over vectors with int64 ids, exact or IVF + exact re-ranking.

    Example:
        >>> vi = VectorIndex(512)
        >>> vi.add(ids, vectors)
        >>> scores, ids = vi.search(query[None], k=10)
    """

    def __init__(self, dim: int, cfg: AnnConfig | None = None):
        faiss = _faiss()
        self.dim, self.cfg = dim, cfg or AnnConfig()
        self.exact = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # every vector, addressable by id
        self.ivf = None  # the approximate layout, once built
        self.nprobe = 0
        self.trained_on = 0  # collection size when the IVF was trained

    # ---- contents -------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return "flat" if self.ivf is None else f"ivf{self.ivf.nlist}-sq8+rerank (nprobe {self.nprobe})"

    def __len__(self) -> int:
        return int(self.exact.ntotal)

    def ids(self) -> np.ndarray:
        """Every stored id, in insertion order."""
        return _faiss().vector_to_array(self.exact.id_map).astype(np.int64)

    def add(self, ids, vectors: np.ndarray) -> None:
        ids, vectors = _as_ids(ids), _as_f32(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        self.exact.add_with_ids(vectors, ids)
        if self.ivf is not None:
            self.ivf.add_with_ids(vectors, ids)

    def remove(self, ids) -> int:
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        sel = _faiss().IDSelectorBatch(ids)
        n = int(self.exact.remove_ids(sel))
        if self.ivf is not None:
            self.ivf.remove_ids(sel)
        return n

    def vectors(self, ids) -> np.ndarray:
        """(N, dim) stored vectors of ``ids`` (each must be present)."""
        ids = _as_ids(ids)
        return self.exact.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.dim), np.float32)

    # ---- search ---------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product.

        Args:
            queries: (Q, dim) float vectors.
            k: results per query.
            allowed: optional ids to restrict the search to (filters).

        Returns:
            (Q, k) scores and (Q, k) ids; missing results have id -1 and score -inf.
        """
        faiss = _faiss()
        q = _as_f32(queries, self.dim)
        k = max(1, int(k))
        sel = faiss.IDSelectorBatch(_as_ids(allowed)) if allowed is not None else None
        if self.ivf is None:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
            scores, ids = self.exact.search(q, k, params=params)
        else:
            scores, ids = self._search_ivf(q, k, sel)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids

    def _search_ivf(self, q: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        kc = max(self.cfg.rerank_factor * k, 40)
        params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=sel) if sel is not None else None
        if params is None:
            self.ivf.nprobe = self.nprobe
        _, cand = self.ivf.search(q, kc, params=params)  # (Q, kc) approximate candidates
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for r in range(len(q)):
            c = cand[r][cand[r] >= 0]
            if not len(c):
                continue
            exact = self.exact.reconstruct_batch(c) @ q[r]  # (kc,) exact re-scoring
            top = np.argsort(-exact, kind="stable")[:k]
            out_s[r, : len(top)], out_i[r, : len(top)] = exact[top], c[top]
        return out_s, out_i

    # ---- layout ---------------------------------------------------------------------------------

    def needs_rebuild(self) -> bool:
        n = len(self)
        if self.ivf is None:
            return n >= self.cfg.ivf_threshold
        if n < self.cfg.ivf_threshold // 2:
            return True  # shrunk well below the threshold: back to exact
        return n >= self.trained_on * self.cfg.rebuild_growth

    def layout_problems(self) -> list[str]:
        """The approximate layout must hold every vector (a repair rebuilds it otherwise)."""
        if self.ivf is not None and self.ivf.ntotal != len(self):
            return [f"approximate layout holds {int(self.ivf.ntotal)} vectors, not {len(self)}"]
        return []

    def clear(self) -> None:
        """Drop every vector and the approximate layout."""
        faiss = _faiss()
        self.exact = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.ivf, self.nprobe, self.trained_on = None, 0, 0

    def close(self) -> None:
        """Nothing to release (the vector store interface: a database engine closes its connection)."""

    def rebuild(self, seed: int = 0) -> None:
        """Choose the layout for the current size: exact, or a freshly trained and tuned IVF."""
        n = len(self)
        if n < self.cfg.ivf_threshold:
            self.ivf, self.nprobe, self.trained_on = None, 0, 0
            return
        faiss = _faiss()
        t0 = time.perf_counter()
        ids = self.ids()
        nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))  # about 4 sqrt(n) lists
        while nlist > 1 and nlist * 39 > n:  # k-means wants ~40 points per list
            nlist //= 2
        rng = np.random.default_rng(seed)
        train = self.vectors(np.sort(rng.choice(ids, size=min(n, nlist * 40), replace=False)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        ivf.cp.seed = seed
        ivf.train(train)
        for start in range(0, n, 100_000):
            chunk = ids[start : start + 100_000]
            ivf.add_with_ids(self.vectors(chunk), chunk)
        self.ivf, self.trained_on = ivf, n
        self.nprobe = self._tune_nprobe(rng)
        log.info("built %s over %d vectors in %.1fs", self.kind, n, time.perf_counter() - t0)

    def _tune_nprobe(self, rng: np.random.Generator, n_queries: int = 400, k: int = 10) -> int:
        """Smallest nprobe whose recall@k reaches the target on sample queries.

        Half the queries are stored vectors (leave-one-out: each one's own id is dropped from both result
        lists), half are blends of two random stored vectors, which fall between the clusters where an
        inverted file is weakest, as queries from another modality (text) tend to.
        """
        ids = self.ids()
        m = min(n_queries // 2, len(ids))
        own = rng.choice(ids, size=m, replace=False)
        a, b = self.vectors(rng.choice(ids, size=m)), self.vectors(rng.choice(ids, size=m))
        blend = a + b
        q = np.concatenate([self.vectors(own), blend / np.linalg.norm(blend, axis=1, keepdims=True)])
        exclude = np.concatenate([own, np.full(m, -2)])

        def top(lists):
            return [[i for i in row if i != x][:k] for row, x in zip(lists, exclude)]

        truth = top(self.exact.search(q, k + 1)[1])
        nprobe = 1
        while True:
            self.nprobe = nprobe
            got = top(self._search_ivf(q, k + 1, None)[1])
            recall = np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)])
            if recall >= self.cfg.target_recall or nprobe >= self.ivf.nlist:
                log.info("nprobe %d: recall@%d %.3f on %d sample queries", nprobe, k, recall, len(q))
                return nprobe
            nprobe = min(self.ivf.nlist, nprobe * 2 if nprobe < 8 else int(nprobe * 1.5))

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file, fsync, rename): a reader sees the old or the new file, never half."""
        faiss = _faiss()
        meta = np.array([self.dim, self.nprobe, self.trained_on], dtype=np.int64)

        def write(tmp: str) -> None:
            blobs = [faiss.serialize_index(self.exact)]
            blobs.append(faiss.serialize_index(self.ivf) if self.ivf is not None else np.zeros(0, np.uint8))
            with open(tmp, "wb") as f:
                np.savez(f, meta=meta, exact=blobs[0], ivf=blobs[1])

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: AnnConfig | None = None) -> VectorIndex:
        faiss = _faiss()
        with np.load(path, allow_pickle=False) as z:
            dim, nprobe, trained_on = (int(v) for v in z["meta"])
            vi = cls(dim, cfg)
            vi.exact = faiss.deserialize_index(z["exact"])
            if z["ivf"].size:
                vi.ivf = faiss.deserialize_index(z["ivf"])
        vi.nprobe, vi.trained_on = nprobe, trained_on
        return vi
