"""Searching an index: query terms to one vector, then ranked rows, for one query or many at once.

Many queries are answered together (the service batches concurrent requests): the unfiltered ones share one
FAISS call, and the rows of every hit are read from SQLite in one query.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .query import SearchResult, Term, parse_query
from .store import SEGMENT_ID_BASE, Store
from .vectors import VectorStore
from .video import rank_hits

VIDEO_FETCH = 4  # hits fetched per result wanted (and the growth when short) while the index holds videos
MAX_FETCH = 16_384  # the most hits one search fetches (Milvus's limit)


@dataclass
class VectorQuery:
    """One search by a query vector (see :meth:`Index.search_many`): ``k`` results at most, those scoring at
    least ``threshold``, among files whose path matches ``path`` and whose date is in ``[after, before]``."""

    vector: np.ndarray
    k: int = 10
    threshold: float | None = None
    path: str | None = None
    after: float | None = None
    before: float | None = None

    @property
    def filtered(self) -> bool:
        return bool(self.path) or self.after is not None or self.before is not None


def query_terms(
    query: str | Sequence[str] | Sequence[Term] | None = None,
    text: str | None = None,
    image: str | os.PathLike | Image.Image | None = None,
    like: int | None = None,
) -> list[Term]:
    """The terms of a search: ``query`` in the CLI's syntax (or as terms), plus the shortcuts with weight 1.

    Raises:
        ValueError: nothing to search for, or a query that does not parse.
    """
    terms = list(parse_query(query)) if isinstance(query, str | list | tuple) and query else []
    if text:
        terms.append(Term(1.0, "text", text))
    if image is not None:
        terms.append(Term(1.0, "image", image))
    if like is not None:
        terms.append(Term(1.0, "id", int(like)))
    if not terms:
        raise ValueError("nothing to search for: give a text, an image (--image) or an indexed id (--like)")
    return terms


def search_many(store: Store, vectors: VectorStore | None, queries: Sequence[VectorQuery]) -> list[list[SearchResult]]:
    """Several searches by query vector at once, each with its own ``k``, threshold and filters.

    The unfiltered ones go to FAISS together, in one call for the largest ``k`` (an exact index then reads
    its vectors once for all of them, a matrix product instead of one pass per query: 3.4x less time per
    query at 32 queries and 20,000 vectors); filtered ones each search their own allowed ids. The rows of
    every hit are read from SQLite in one query. A query gets what a search alone would give it (on an IVF
    layout, its candidates come from the largest ``k`` of the call, so it can only find as much or more).

    When the index holds videos, a video's segments are hits of their own but it is one result
    (:func:`.video.rank_hits`), so more hits are fetched than results wanted, and more again for a query that
    fell short while hits remained (:func:`_next_fetch`: never once the last hit scores under the threshold).
    """
    out: list[list[SearchResult]] = [[] for _ in queries]
    if vectors is None or not queries:  # (no len() here: counting a Milvus collection is a round trip)
        return out
    videos = store.has_segments()
    fetch = {i: min(q.k * VIDEO_FETCH, MAX_FETCH) if videos else q.k for i, q in enumerate(queries)}
    seen: dict[int, set[int]] = {i: set() for i in fetch}  # per query: the files its hits so far belong to
    while fetch:
        hits = _plain_hits(vectors, queries, fetch) | _filtered_hits(store, vectors, queries, fetch)
        found = {int(j) for _, ids in hits.values() for j in ids if j >= 0}
        segments = store.segments(ids=[j for j in found if j >= SEGMENT_ID_BASE]) if videos else {}
        rows = store.get({j for j in found if j < SEGMENT_ID_BASE} | {s.file_id for s in segments.values()})
        again = {}
        for i, (scores, ids) in hits.items():
            q = queries[i]
            out[i] = rank_hits(scores, ids, rows, segments, q.k, q.threshold)
            if videos and len(out[i]) < q.k and int((ids >= 0).sum()) >= fetch[i]:  # short, and hits remain
                files = {segments[j].file_id if j in segments else j for j in map(int, ids) if j >= 0}
                more = _next_fetch(store, q, fetch[i], scores, files, seen[i], len(out[i]))
                seen[i] = files
                if more:
                    again[i] = more
        fetch = again
    return out


def _next_fetch(
    store: Store, q: VectorQuery, fetched: int, scores: np.ndarray, files: set[int], before: set[int], found: int
) -> int:
    """How many hits the next round fetches for a query that fell short (0: stop).

    It stops at ``MAX_FETCH``, and once the last hit fetched scores under the threshold (every later one does too).
    A round that added no new file (the hits are segments of videos already seen) jumps to the count of those
    files' vectors plus the results still missing, past which a new file must appear, rather than growing blindly;
    it stops when that is no more than it has.
    """
    if fetched >= MAX_FETCH or (q.threshold is not None and len(scores) and float(scores[-1]) < q.threshold):
        return 0
    if files - before:
        return min(fetched * VIDEO_FETCH, MAX_FETCH)
    bound = store.vector_count(files) + q.k - found
    return min(bound, MAX_FETCH) if bound > fetched else 0


def _plain_hits(
    vectors: VectorStore, queries: Sequence[VectorQuery], fetch: dict[int, int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(scores, ids) of the unfiltered queries among ``fetch`` (query -> hits wanted), from one FAISS call."""
    plain = [i for i in fetch if not queries[i].filtered]
    if not plain:
        return {}
    scores, ids = vectors.search(np.stack([queries[i].vector for i in plain]), max(fetch[i] for i in plain))
    return {i: (scores[row, : fetch[i]], ids[row, : fetch[i]]) for row, i in enumerate(plain)}


def _filtered_hits(
    store: Store, vectors: VectorStore, queries: Sequence[VectorQuery], fetch: dict[int, int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(scores, ids) of the filtered queries among ``fetch``, each among the ids its filters allow."""
    hits = {}
    for i in fetch:
        q = queries[i]
        if q.filtered:
            allowed = store.filter_ids(q.path, q.after, q.before)
            if len(allowed):
                scores, ids = vectors.search(q.vector[None], fetch[i], allowed)
                hits[i] = scores[0], ids[0]
    return hits
