"""Re-ranking a search's top K with a cross-attention re-ranker (``mmfusion search --rerank``, ``rerank=true``).

The first stage (the CLIP vectors in the index) finds the K most similar images fast; a re-ranker
(:class:`~mmfusion.models.reranker.Reranker`) then reads the query's words against each candidate's patches and
orders them by its own score. The index keeps one vector per image, not its patches, so a candidate's file is
decoded again (as indexing decodes it) and encoded by the re-ranker's image tower; those memories are kept in an
LRU cache keyed by the file's id and content hash, so a candidate seen by an earlier query costs nothing (the
benchmark, ``benchmarks/bench_rerank.py``, measures both). A result's ``score`` becomes the re-ranker's; the
first stage's cosine stays in its metadata as ``similarity``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from ..data.images import ImageDecodeError
from .decode import decode_file
from .query import SearchResult, Term
from .store import is_video_format


class PairScorer(Protocol):
    """What re-ranks: a score per candidate image for one query text (a :class:`Reranker` is wrapped as one)."""

    def score_files(self, text: str, rows: Sequence[Any]) -> np.ndarray:
        """(K,) scores of ``rows`` (index rows with ``id``, ``path``, ``hash``), NaN for an unreadable file."""
        ...


def rerank_text(terms: Sequence[Term]) -> str:
    """The text a re-ranker reads for a query: its text terms of positive weight, joined.

    Raises:
        ValueError: the query has no such text (a search by image alone cannot be re-ranked by words).
    """
    texts = [str(t.value) for t in terms if t.kind == "text" and t.weight > 0]
    if not texts:
        raise ValueError("re-ranking reads the query's words: give a text to search for (not only images or ids)")
    return " ".join(texts)


class SearchReranker:
    """Scores candidate files with a re-ranker, caching each image's memory by (id, content hash).

    Args:
        model: a :class:`~mmfusion.models.reranker.Reranker` or a
            :class:`~mmfusion.models.caption_ranker.CaptionRanker`.
        cache_size: image memories kept (about 25 KB each for rerank-tiny).
        max_pixels: larger files are not decoded (as the index's limit).
        first_stage_weight: what the re-ranked score adds of the first stage's score (default: the model's own,
            0 for a cross-attention re-ranker).
    """

    def __init__(
        self, model, cache_size: int = 2048, max_pixels: int | None = None, first_stage_weight: float | None = None
    ):
        self.model, self.cache_size, self.max_pixels = model, cache_size, max_pixels
        self.name = getattr(model, "name", "reranker")
        # a captioner's likelihood is mixed with the first stage's similarity (rerank_results); a cross-attention
        # re-ranker carries its CLIP's logit inside its score
        weight = getattr(model, "first_stage_weight", 0.0) if first_stage_weight is None else first_stage_weight
        self.first_stage_weight = float(weight)
        self._cache: OrderedDict[tuple[int, bytes], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.last_timing: dict[str, float] = {}

    def clear(self) -> None:
        """Empty the memory cache (the next query decodes and encodes every candidate)."""
        with self._lock:
            self._cache.clear()

    def _memories(self, rows: Sequence[Any]) -> tuple[list[Any | None], int]:
        """Per row its (1, ...) memory, None for a file that cannot be read; and how many were encoded now."""
        import torch

        from ..data.images import normalize_batch
        from ..models.reranker import ImageMemory

        with self._lock:
            found = [self._cache.get((r.id, r.hash)) for r in rows]
            for r, m in zip(rows, found):
                if m is not None:
                    self._cache.move_to_end((r.id, r.hash))
        todo, pixels = [], []
        size = self.model.transform.size
        for n, r in enumerate(rows):
            if found[n] is None:
                try:
                    kw = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
                    pixels.append(decode_file(r.path, size, **kw).pixels)
                    todo.append(n)
                except ImageDecodeError:
                    continue
        if todo:
            t = self.model.transform
            x = normalize_batch(torch.from_numpy(np.stack(pixels)), t.mean, t.std)
            with torch.no_grad():
                mem = self.model.encode_images(x)
            with self._lock:
                for j, n in enumerate(todo):
                    # copies: a view would keep the whole batch alive until every entry of it is evicted
                    found[n] = ImageMemory(mem.tokens[j : j + 1].clone(), mem.embeds[j : j + 1].clone())
                    self._cache[(rows[n].id, rows[n].hash)] = found[n]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return found, len(todo)

    def score_files(self, text: str, rows: Sequence[Any]) -> np.ndarray:
        import torch

        from ..models.reranker import ImageMemory

        t0 = time.perf_counter()
        mems, encoded = self._memories(rows)
        t1 = time.perf_counter()
        ok = [n for n, m in enumerate(mems) if m is not None]
        out = np.full(len(rows), np.nan)
        if ok:
            memory = ImageMemory(torch.cat([mems[n].tokens for n in ok]), torch.cat([mems[n].embeds for n in ok]))
            out[ok] = self.model.score(text, memory).numpy()
        self.last_timing = {"images_ms": (t1 - t0) * 1000, "head_ms": (time.perf_counter() - t1) * 1000,
                            "encoded": encoded, "cached": len(rows) - encoded}  # fmt: skip
        return out


def rerank_results(
    scorer: PairScorer, rows: Mapping[int, Any], text: str, results: Sequence[SearchResult]
) -> list[SearchResult]:
    """``results`` re-ordered by ``scorer``'s score for ``text`` (plus ``scorer.first_stage_weight`` times their
    first-stage score, when it has one), each with that score (its first-stage score kept as ``similarity`` in the
    metadata); files that can no longer be read keep their order, after the others.

    A video is left out: the re-ranker reads one image, not a video's frames, so a video keeps its place (and its
    first-stage score) and the images re-ranked fill the other places. (Scoring its matched frame instead would
    cost a seek and a decode per video and query, for a score on one frame of a time range.)

    Args:
        rows: the index rows of the results by id (``store.get(ids)``: their files' paths, hashes and formats).
    """
    if not results:
        return []
    images = [r for r in results if r.id not in rows or not is_video_format(rows[r.id].format)]
    present = [r for r in images if r.id in rows]
    scores = scorer.score_files(text, [rows[r.id] for r in present]) if present else np.zeros(0)
    weight = float(getattr(scorer, "first_stage_weight", 0.0))
    if weight:  # the re-ranker's score plus a share of the first stage's (a captioner's likelihood: CaptionRanker)
        scores = scores + weight * np.array([r.score for r in present])
    scored = [(float(s), r) for s, r in zip(scores, present) if np.isfinite(s)]
    scored.sort(key=lambda x: -x[0])  # stable: equal scores keep the first stage's order
    done = {r.id for _, r in scored}
    ordered = iter([replace(r, score=s, metadata={**r.metadata, "similarity": round(r.score, 6)}) for s, r in scored]
                   + [r for r in images if r.id not in done])  # fmt: skip
    is_image = {id(r) for r in images}
    return [next(ordered) if id(r) in is_image else r for r in results]


def search_reranked(index, scorer: PairScorer, query, k: int = 10, rerank_k: int = 20, **options) -> list[SearchResult]:
    """:meth:`Index.search` for ``max(k, rerank_k)`` results, the first ``rerank_k`` re-ranked by ``scorer`` on the
    query's text (videos keep their places: :func:`rerank_results`), then the first ``k``.

    Args:
        index: an open :class:`~mmfusion.index.Index`.
        query: the query as :meth:`Index.search` takes it (CLI tokens, a string, or terms), with a text term.
        options: the rest of :meth:`Index.search`'s keywords (threshold, path, after, before, ensemble, text, ...).
    """
    from .search import query_terms

    text = rerank_text(query_terms(query, options.get("text"), options.get("image"), options.get("like")))
    results = index.search(query, k=max(k, rerank_k), **options)
    head = rerank_results(scorer, index.store.get([r.id for r in results[:rerank_k]]), text, results[:rerank_k])
    return (head + results[rerank_k:])[:k]


def as_scorer(model_or_scorer) -> PairScorer:
    """A re-ranker model wrapped as a :class:`PairScorer` (a scorer is returned as it is)."""
    return model_or_scorer if hasattr(model_or_scorer, "score_files") else SearchReranker(model_or_scorer)


def load_reranker(spec: str, cache_size: int = 2048) -> SearchReranker:
    """A re-ranker checkpoint ready to re-rank searches: a ``mmfusion train rerank`` run, or a captioner run (scored
    by its captions' likelihood, :class:`~mmfusion.models.caption_ranker.CaptionRanker`)."""
    from ..models.caption_ranker import as_reranker
    from ..models.checkpoint import load

    return SearchReranker(as_reranker(load(spec), spec), cache_size)
