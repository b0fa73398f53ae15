"""Does the vector store (FAISS, or Milvus) agree with SQLite, the source of truth? And if not, make it agree.

A crash between a chunk's SQLite commit and the FAISS save leaves FAISS behind (rows missing) or, after a
deletion, ahead (phantom ids); opening an index repairs either from SQLite, which costs only the difference.
"""

from __future__ import annotations

import numpy as np

from .ann import AnnConfig
from .store import Store
from .vectors import VectorStore
from .writer import CheckReport


def check_vectors(
    store: Store, vectors: VectorStore | None, ann: AnnConfig, repair: bool = False, full: bool = False
) -> tuple[CheckReport, VectorStore | None]:
    """Compare FAISS ids with the live SQLite rows (and, with ``full``, look for NaN vectors).

    Args:
        store: the SQLite side.
        vectors: the vector store (None when the index holds nothing yet).
        ann: the layout settings of a rebuilt FAISS side (a Milvus collection keeps its own).
        repair: make FAISS agree with SQLite (in memory; a writer saves the result).
        full: also read every vector and check that it is finite and the same in both stores.

    Returns:
        The report, and the FAISS side to use from now on (``vectors`` repaired, or a rebuilt one).
    """
    db_ids = store.ids()
    if vectors is None:
        return CheckReport(len(db_ids) == 0, [] if not len(db_ids) else ["no vector index"], []), None
    fa_ids = vectors.ids()
    uniq = np.unique(fa_ids)
    extra, missing = np.setdiff1d(uniq, db_ids), np.setdiff1d(db_ids, uniq)
    problems = []
    if len(uniq) != len(fa_ids):
        problems.append(f"{len(fa_ids) - len(uniq)} duplicate ids in the vector index")
    if len(extra):
        problems.append(f"{len(extra)} ids in the vector index have no file row (phantoms)")
    if len(missing):
        problems.append(f"{len(missing)} file rows are missing from the vector index")
    problems += vectors.layout_problems()
    if full:
        problems += _vector_problems(store, vectors, uniq)
    repaired: list[str] = []
    if repair and problems:
        if len(uniq) != len(fa_ids) or (full and any("differ" in p for p in problems)):
            vectors = _rebuilt(store, vectors, ann)
            repaired.append(f"rebuilt the vector index from {len(vectors)} stored vectors")
        else:
            repaired += _patch(store, vectors, extra, missing)
        if vectors.layout_problems():
            vectors.rebuild()  # (a change of layout as the collection grows is the writer's job, in update)
    ok = not problems or (repair and bool(repaired))
    return CheckReport(ok, problems, repaired), vectors


def _vector_problems(store: Store, vectors: VectorStore, present_ids: np.ndarray) -> list[str]:
    """Non-finite stored vectors, and FAISS vectors that differ from the stored ones."""
    problems = []
    for ids, vecs in store.iter_vectors():
        bad = ~np.isfinite(vecs).all(1)
        if bad.any():
            problems.append(f"{int(bad.sum())} stored vectors are not finite (ids {ids[bad][:5].tolist()})")
        present = np.isin(ids, present_ids)
        if present.any() and not np.allclose(vectors.vectors(ids[present]), vecs[present], atol=1e-6):
            problems.append("vectors in the vector index differ from the database")
    return problems


def _rebuilt(store: Store, vectors: VectorStore, ann: AnnConfig) -> VectorStore:
    """Every vector again from SQLite, into the same store (FAISS: exact, with ``ann``'s settings)."""
    vectors.clear()  # (FAISS keeps its settings, which the index gave it: ``ann``)
    for ids, vecs in store.iter_vectors():
        vectors.add(ids, vecs)
    return vectors


def _patch(store: Store, vectors: VectorStore, extra: np.ndarray, missing: np.ndarray) -> list[str]:
    """Remove the phantom ids and add the missing rows' vectors: what a crash between commit and save leaves."""
    done = []
    if len(extra):
        vectors.remove(extra)
        done.append(f"removed {len(extra)} phantom ids")
    if len(missing):
        for start in range(0, len(missing), 20_000):
            ids, vecs = store.vectors(missing[start : start + 20_000])
            vectors.add(ids, vecs)
        done.append(f"added {len(missing)} vectors from the database")
    return done
