"""Vectors in a Milvus collection: the index's vector store when many replicas search one collection.

One collection per index: an int64 primary key (the file's id in the index's SQLite store, which keeps the
metadata and every vector) and a float vector field, searched by inner product (IP) on L2-normalised vectors,
i.e. cosine similarity, as FAISS's flat IP. Through a Milvus server (``http://HOST:PORT``) or milvus-lite (a
local path: the same client code in this process; one process per file).

- Index type: FLAT (exact) by default on milvus-lite, HNSW on a server (M 16, efConstruction 200; searched
  with ef = max(ef, k), ef 128 by default); IVF_FLAT (nlist, nprobe) and AUTOINDEX may be asked for.
- Filters: ``allowed`` ids become ``id in [...]`` expressions, at most ``FILTER_CHUNK`` ids each; a larger
  set is searched a chunk at a time and the chunks' hits merged (exact on FLAT). When the set is most of the
  collection (at least ``POST_FILTER_SHARE``), one unfiltered search over-fetches k / share * 2 hits and keeps
  the allowed ones, falling back to the chunks when that leaves fewer than ``k``.
- Writes are upserts keyed by id, so replaying a chunk after a crash is harmless; a renamed file keeps its id
  (and vector), so a move needs nothing here; deletes remove by id.
- The collection carries its index's owner id (a collection property): opening a collection that another
  index owns is an error, so two indexes never mix their ids in one collection.
- Consistency level Strong: a search sees every write acknowledged before it.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

log = logging.getLogger(__name__)

OWNER_PROPERTY = "mmfusion.index"  # the collection property naming the index that owns it
FILTER_CHUNK = 16_384  # ids per `id in [...]` expression
POST_FILTER_SHARE = 0.5  # allowed sets this share of the collection or more are filtered after the search
MAX_TOPK = 16_384  # Milvus's limit on hits per query (and rows per query call)
_WRITE_BATCH = 2_000  # rows per upsert call (keeps each request well under the 64 MiB gRPC limit at dim 2048)
_BUILD_DEFAULTS = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}
_SEARCH_DEFAULTS = {"HNSW": {"ef": 128}, "IVF_FLAT": {"nprobe": 32}}


class MilvusMissingError(ImportError, RuntimeError):
    """pymilvus is not installed (a RuntimeError too, so the CLI reports it as a plain error)."""


class MilvusUnavailableError(ConnectionError, RuntimeError):
    """The Milvus server (or milvus-lite file) cannot be reached."""


def _pymilvus():
    try:
        import pymilvus
    except ImportError as e:
        raise MilvusMissingError(
            "vectors in Milvus need pymilvus (and milvus-lite for a local .db file): pip install 'mmfusion[milvus]'"
        ) from e
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs every failed call with a traceback
    return pymilvus


def _as_ids(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class MilvusVectors:
    """The :class:`~mmfusion.index.vectors.VectorStore` on a Milvus collection.

    Args:
        uri: ``http://HOST:PORT`` for a server, or a milvus-lite path (``.db``).
        collection: the collection's name.
        dim: the vectors' width.
        owner: the owning index's id (recorded in its SQLite meta and on the collection).
        create: create the collection when it is missing (a writer); a reader is told how to repopulate it.
        token: the server's token (``user:password`` or an API key); empty: none.
        index_type: FLAT, HNSW, IVF_FLAT or AUTOINDEX, used when the collection is created.
        params: the index type's numbers (M, efConstruction, nlist) and search numbers (ef, nprobe).
    """

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        owner: str,
        create: bool = False,
        token: str = "",
        index_type: str = "FLAT",
        params: dict | None = None,
    ):
        pm = _pymilvus()
        self.uri, self.name, self.dim, self.owner, self.index_type = uri, collection, int(dim), owner, index_type
        params = dict(params or {})
        self.search_params = _SEARCH_DEFAULTS.get(index_type, {}) | {
            k: params.pop(k) for k in ("ef", "nprobe") if k in params
        }
        self.build_params = _BUILD_DEFAULTS.get(index_type, {}) | params
        self.lite = not uri.startswith(("http://", "https://"))
        try:
            self.client = pm.MilvusClient(uri, token=token) if token else pm.MilvusClient(uri)
        except Exception as e:
            where = f"the milvus-lite file {uri}" if self.lite else f"the Milvus server at {uri}"
            hint = (
                " (milvus-lite serves one process at a time: is another one using it?)"
                if self.lite
                else " (is it running? see the README's 'Vectors in Milvus')"
            )
            raise MilvusUnavailableError(f"cannot open {where}: {e}{hint}") from e
        try:
            self._open(create)
        except BaseException:
            self.client.close()
            raise

    # ---- the collection -------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        c = self.client
        if not c.has_collection(self.name):
            if not create:
                raise FileNotFoundError(
                    f"the Milvus collection {self.name} at {self.uri} is missing; repopulate it from the index's "
                    "SQLite store with: mmfusion index rebuild --db DB"
                )
            self._create()
            log.info("created the Milvus collection %s at %s (%s)", self.name, self.uri, self.index_type)
        desc = c.describe_collection(self.name)
        owner = (desc.get("properties") or {}).get(OWNER_PROPERTY)
        if owner != self.owner:
            raise ValueError(
                f"the Milvus collection {self.name} at {self.uri} belongs to "
                f"{'another index' if owner else 'something other than an mmfusion index'}; give each index its "
                "own collection (another COLLECTION in --vectors), or drop that collection if it is stale"
            )
        dim = next((int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == "vector"), None)
        if dim != self.dim:
            raise ValueError(
                f"the Milvus collection {self.name} at {self.uri} holds {dim}-d vectors, not the index's {self.dim}-d"
            )
        c.load_collection(self.name)  # searches need it loaded (a no-op when it is)

    def _create(self) -> None:
        pm, c = _pymilvus(), self.client
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pm.DataType.INT64, is_primary=True)
        schema.add_field("vector", pm.DataType.FLOAT_VECTOR, dim=self.dim)
        index = c.prepare_index_params()
        index.add_index("vector", index_type=self.index_type, metric_type="IP", params=self.build_params)
        c.create_collection(
            self.name, schema=schema, index_params=index, consistency_level="Strong",
            properties={OWNER_PROPERTY: self.owner},
        )  # fmt: skip

    @property
    def kind(self) -> str:
        where = f"milvus-lite {self.uri}" if self.lite else f"Milvus {self.uri}"
        return f"{where}, collection {self.name} ({self.index_type}, IP)"

    def close(self) -> None:
        self.client.close()

    def clear(self) -> None:
        """Drop and re-create the collection (same owner, same index type): a rebuild from SQLite follows."""
        self.client.drop_collection(self.name)
        self._create()
        self.client.load_collection(self.name)

    # ---- contents -------------------------------------------------------------------------------

    def __len__(self) -> int:
        res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def ids(self) -> np.ndarray:
        """Every stored id, read in id windows (faster than a query iterator: 2 s for 100k ids on milvus-lite);
        a window is widened where ids are sparse and narrowed when it hits the per-call row limit."""
        total, found, lo, width = len(self), [], 0, MAX_TOPK
        while sum(map(len, found)) < total:
            rows = self.client.query(
                self.name, filter=f"id >= {lo} and id < {lo + width}", output_fields=["id"], limit=MAX_TOPK
            )
            if len(rows) >= MAX_TOPK and width > 1:  # may be cut short: narrow the window and read it again
                width //= 2
                continue
            found.append(np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows)))
            lo += width
            if len(rows) < MAX_TOPK // 4:
                width *= 2
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def add(self, ids, vectors: np.ndarray) -> None:
        """Upsert: an id already stored gets this vector (so repeating a write is harmless)."""
        ids = _as_ids(ids)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(ids):
            raise ValueError(f"expected {len(ids)} vectors of width {self.dim}, got {vectors.shape}")
        for start in range(0, len(ids), _WRITE_BATCH):
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[start : start + _WRITE_BATCH],
                                                                 vectors[start : start + _WRITE_BATCH])]  # fmt: skip
            self.client.upsert(self.name, rows)

    def remove(self, ids) -> int:
        ids = _as_ids(ids)
        n = 0
        for start in range(0, len(ids), FILTER_CHUNK):
            res = self.client.delete(self.name, ids=ids[start : start + FILTER_CHUNK].tolist())
            n += int(res.get("delete_count", 0)) if isinstance(res, dict) else len(res or [])
        return n

    def vectors(self, ids) -> np.ndarray:
        ids = _as_ids(ids)
        got: dict[int, list] = {}
        for start in range(0, len(ids), FILTER_CHUNK):
            rows = self.client.get(self.name, ids=ids[start : start + FILTER_CHUNK].tolist(), output_fields=["vector"])
            got.update((int(r["id"]), r["vector"]) for r in rows)
        missing = [int(i) for i in ids if int(i) not in got]
        if missing:
            raise KeyError(f"ids not in the Milvus collection {self.name}: {missing[:5]}")
        return np.asarray([got[int(i)] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    # ---- search ---------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product, among ``allowed`` ids when given (see the module's notes on filters).

        Returns:
            (Q, k) scores and (Q, k) ids; missing results have id -1 and score -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"expected queries of shape (Q, {self.dim}), got {q.shape}")
        k = min(max(1, int(k)), MAX_TOPK)
        if allowed is None:
            return self._search(q, k)
        allowed = np.unique(_as_ids(allowed))
        if not len(allowed):
            return _empty(len(q), k)
        if len(allowed) <= FILTER_CHUNK:
            return self._search(q, k, allowed)
        n = len(self)
        share = len(allowed) / max(n, 1)
        if share >= POST_FILTER_SHARE:
            got = self._post_filtered(q, k, allowed, min(MAX_TOPK, math.ceil(2 * k / share) + 10), n)
            if got is not None:
                return got
        parts = [self._search(q, k, allowed[s : s + FILTER_CHUNK]) for s in range(0, len(allowed), FILTER_CHUNK)]
        return _merge(parts, k)

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        params = dict(self.search_params)
        if "ef" in params:
            params["ef"] = max(params["ef"], k)  # HNSW needs ef >= k
        expr = f"id in [{','.join(map(str, allowed.tolist()))}]" if allowed is not None else ""
        res = self.client.search(
            self.name, data=list(q), limit=k, filter=expr, output_fields=["id"],
            search_params={"metric_type": "IP", "params": params},
        )  # fmt: skip
        scores, ids = _empty(len(q), k)
        for r, hits in enumerate(res):
            for j, h in enumerate(hits):
                scores[r, j], ids[r, j] = h["distance"], h["id"]
        return scores, ids

    def _post_filtered(self, q: np.ndarray, k: int, allowed: np.ndarray, fetch: int, n: int):
        """Over-fetch ``fetch`` hits unfiltered and keep the allowed ones; None when a query is left short."""
        scores, ids = self._search(q, min(fetch, n))
        out_s, out_i = _empty(len(q), k)
        for r in range(len(q)):
            keep = np.isin(ids[r], allowed) & (ids[r] >= 0)
            if keep.sum() < min(k, len(allowed)):
                return None
            out_s[r], out_i[r] = scores[r][keep][:k], ids[r][keep][:k]
        return out_s, out_i

    # ---- layout and persistence -----------------------------------------------------------------

    def needs_rebuild(self) -> bool:
        return False  # Milvus builds and maintains its index itself

    def rebuild(self, seed: int = 0) -> None:
        pass

    def layout_problems(self) -> list[str]:
        return []

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Nothing to write beside the index: Milvus keeps acknowledged writes (its write-ahead log)."""


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (Q, k) result sets, per query."""
    scores = np.concatenate([s for s, _ in parts], axis=1)  # (Q, k * parts)
    ids = np.concatenate([i for _, i in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
