"""What a cross-attention re-ranker adds over its CLIP: composition accuracy per type, and semantic precision@1
when it re-ranks the CLIP's top K (as ``mmfusion search --rerank`` does).

- :class:`RerankerScorer` scores the composition benchmark's pairs with a re-ranker (a
  :class:`~mmfusion.eval.composition.Scorer`); :func:`compare_composition` runs the benchmark for the re-ranker and
  for its CLIP alone on the same tests.
- :func:`reranked_precision`: for every caption of a retrieval set, the CLIP's top K images re-ordered by the
  re-ranker; semantic P@1 before and after, by caption kind, and the head's cost per query.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.shapes import caption_kind, satisfies
from ..models.reranker import ImageMemory, PairScoring, TextFeatures
from .composition import DIRECTIONS, CompositionSet, composition_report, score_items, shapes_set
from .report import RetrievalSet, shapes_config_of


@torch.no_grad()
def image_memory(model: PairScoring, images: np.ndarray | Sequence[Image.Image], batch_size: int = 256) -> ImageMemory:
    """The re-ranker's memory of uint8 images (N, S, S, 3) or PIL images, in batches."""
    parts = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        parts.append(model.encode_images([Image.fromarray(a) if isinstance(a, np.ndarray) else a for a in chunk]))
    return ImageMemory(torch.cat([p.tokens for p in parts]), torch.cat([p.embeds for p in parts]))


@torch.no_grad()
def text_features(model: PairScoring, texts: Sequence[str], batch_size: int = 512) -> TextFeatures:
    """The re-ranker's features of texts, padded to the longest; each distinct text is encoded once."""
    unique: dict[str, int] = {}
    index = torch.as_tensor([unique.setdefault(t, len(unique)) for t in texts], dtype=torch.long)
    keys = list(unique)
    tokens = model.tokenize(keys)
    feats = [model.encode_texts(tokens[i : i + batch_size]) for i in range(0, len(keys), batch_size)]
    L = max(f.tokens.shape[1] for f in feats)
    # features (T, L, W) or, for a captioner, token ids (T, L): padded along L with zeros (PAD_ID is 0)
    padded = torch.cat([F.pad(f.tokens, (0, 0) * (f.tokens.dim() - 2) + (0, L - f.tokens.shape[1])) for f in feats])
    return TextFeatures(
        padded[index], torch.cat([f.eot for f in feats])[index], torch.cat([f.embeds for f in feats])[index]
    )


class RerankerScorer:
    """Scores the composition benchmark's (image, text) pairs with a re-ranker (each image and text encoded once)."""

    def __init__(self, model: PairScoring):
        self.model = model

    def score(self, data: CompositionSet, pairs: np.ndarray) -> np.ndarray:
        memory = image_memory(self.model, data.pixels())
        feats = text_features(self.model, data.texts)
        return self.model.score_memory(memory, feats, torch.as_tensor(pairs, dtype=torch.long)).numpy()


def compare_composition(
    model: PairScoring, n: int = 500, split: str = "test", out=None, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """The composition benchmark on ShapesWorld for a re-ranker and for its CLIP alone (when it has one: a
    cross-attention :class:`~mmfusion.models.reranker.Reranker`), on the same tests.

    Returns:
        ``{"reranker": report, "clip": report}``, each as :func:`~.composition.composition_report` makes it.
    """
    from .composition import EmbedderScorer

    bench = shapes_set(n, split, shapes_config_of(model), seed)
    name = getattr(model, "name", "reranker")
    reports = {"reranker": composition_report(bench, score_items(RerankerScorer(model), bench), f"{name} (re-ranker)")}
    if getattr(model, "clip", None) is not None:  # a captioner re-ranks without a CLIP of its own
        clip = EmbedderScorer(model.clip, progress)
        reports["clip"] = composition_report(bench, score_items(clip, bench), f"{name}'s CLIP")
    if out is not None:
        from . import plots
        from .report import write_report

        write_report(reports, f"{out}/composition_rerank.json")
        plots.plot_composition(reports["reranker"]["types"], f"{out}/composition_rerank.png",
                               title=f"composition with the re-ranker: {bench.source}", chance=0.5)  # fmt: skip
    return reports


def comparison_lines(reports: dict[str, Any]) -> list[str]:
    """Per type and direction, the CLIP's accuracy and the re-ranker's (the re-ranker's alone without a CLIP)."""
    from .composition import summary_lines

    if "clip" not in reports:
        return summary_lines(reports["reranker"])
    clip, rr = reports["clip"], reports["reranker"]
    lines = [f"composition on {rr['data']}: CLIP alone -> with the re-ranker (chance 0.50)"]
    for kind, t in rr["types"].items():
        cells = [f"{DIRECTIONS[d]} {clip['types'][kind][d]['accuracy']:.3f} -> {t[d]['accuracy']:.3f}"
                 for d in DIRECTIONS if d in t]  # fmt: skip
        lines.append(f"  {kind.ljust(15)} " + "   ".join(cells))
    means = [f"{DIRECTIONS[d]} {clip['mean'][d]:.3f} -> {rr['mean'][d]:.3f}" for d in DIRECTIONS if d in rr["mean"]]
    lines.append("  mean of types   " + "   ".join(means))
    return lines


@torch.no_grad()
def reranked_precision(
    reranker: PairScoring,
    ds: RetrievalSet,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    k: int = 20,
    weights: Sequence[float] = (),
) -> dict[str, Any]:
    """Semantic P@1 of text-to-image retrieval with the first stage's top ``k`` re-ordered by ``reranker``.

    Args:
        ds: a retrieval set with scenes and meanings (ShapesWorld).
        image_emb, text_emb: the first stage's normalised embeddings of ``ds``'s images and captions (flattened).
        k: how many of the first stage's results are re-ranked.
        weights: shares of the first stage's cosine to try besides the re-ranker's own ``first_stage_weight``
            (how it was chosen: on the validation split, ``benchmarks/bench_rerank_weight.py``).

    Returns:
        ``semantic_P@1`` before and after, by caption kind, and ``head_ms_per_query``: the re-ranker's cost per
        caption once the images' memories exist (what a search pays on top of encoding its K images); with
        ``weights``, ``semantic_P@1_by_weight``.
    """
    if ds.scenes is None or ds.meanings is None:
        raise ValueError(f"{ds.source} does not say what its captions mean: re-ranked precision needs ShapesWorld")
    texts = [c for caps in ds.captions for c in caps]
    meanings = [m for ms in ds.meanings for m in ms]
    k = min(k, len(ds.images))
    top = (text_emb @ image_emb.t()).topk(k, dim=1).indices  # (T, k) first-stage candidates
    memory = image_memory(reranker, ds.images)
    feats = text_features(reranker, texts)
    t0 = time.perf_counter()
    pairs = torch.stack([top.flatten(), torch.arange(len(texts)).repeat_interleave(k)], dim=1)  # (T*k, 2)
    raw = reranker.score_memory(memory, feats, pairs).view(len(texts), k)  # (T, k)
    cosine = (text_emb @ image_emb.t()).gather(1, top)

    def reranked(weight: float) -> torch.Tensor:
        """(T,) the re-ranked top 1: as a search mixes them (index.rerank.rerank_results), the re-ranker's score
        plus a share of the first stage's cosine."""
        scores = raw + weight * cosine if weight else raw
        return top[torch.arange(len(texts)), scores.argmax(dim=1)]

    best = reranked(float(getattr(reranker, "first_stage_weight", 0.0)))
    head_ms = (time.perf_counter() - t0) * 1000 / max(1, len(texts))

    def precision(first: torch.Tensor) -> tuple[float, dict[str, float]]:
        ok = np.array([satisfies(ds.scenes[int(i)], m) for i, m in zip(first.tolist(), meanings)], dtype=float)
        kinds = np.array([caption_kind(m) for m in meanings])
        return float(ok.mean()), {g: round(float(ok[kinds == g].mean()), 4) for g in sorted(set(kinds))}

    before, before_by = precision(top[:, 0])
    after, after_by = precision(best)
    by_weight = {str(w): round(precision(reranked(float(w)))[0], 4) for w in weights}
    return {
        **({"semantic_P@1_by_weight": by_weight} if weights else {}),
        "rerank_k": k,
        "reranker": getattr(reranker, "name", "reranker"),
        "semantic_P@1": {"before": round(before, 4), "after": round(after, 4)},
        "semantic_P@1_by_kind": {"before": before_by, "after": after_by},
        "head_ms_per_query": round(head_ms, 3),
        "n_texts": len(texts),
    }


def reranked_lines(r: dict[str, Any]) -> list[str]:
    p, by = r["semantic_P@1"], r["semantic_P@1_by_kind"]
    return [
        f"  re-ranking the top {r['rerank_k']} with {r['reranker']}: semantic P@1 {p['before']:.3f} -> {p['after']:.3f}"
        f" ({r['head_ms_per_query']:.2f} ms per query for the head, image memories precomputed)",
        "    by caption kind: " + ", ".join(f"{g} {by['before'][g]:.2f} -> {by['after'][g]:.2f}" for g in by["after"]),
    ]


def rerank_retrieval(
    reranker: PairScoring,
    embedder,
    data: str = "shapes",
    n: int = 1000,
    split: str = "test",
    k: int = 20,
    weights: Sequence[float] = (),
) -> dict[str, Any]:
    """:func:`reranked_precision` on a retrieval set, the first stage being ``embedder`` (the index's CLIP)."""
    from .report import retrieval_set
    from .retrieval import embed_images, embed_texts

    ds = retrieval_set(data, n, split, shapes_config_of(embedder))
    texts = [c for caps in ds.captions for c in caps]
    image_emb, text_emb = embed_images(embedder, ds.images), embed_texts(embedder, texts)
    return reranked_precision(reranker, ds, image_emb, text_emb, k, weights)
