"""The quality gate of a quantised model: retrieval Recall@K (and zero-shot accuracy where the data has labels) of
the model before and after, on the user's data, and a refusal when any of them dropped by more than allowed.

Both models embed the same images and texts (ShapesWorld's test split as the model was trained on it, or a
folder in mmfusion's caption format) and classify the same labelled images (ShapesWorld's single objects, or
class folders); the metrics are the project's own (:mod:`mmfusion.eval.retrieval`, :mod:`mmfusion.eval.zeroshot`).
The report also says how close the two models' embeddings are (cosine of each image's and text's two vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval.report import RetrievalSet, ZeroShotGroup, retrieval_set, shapes_config_of, zeroshot_groups
from ..eval.retrieval import embed_images, embed_texts, retrieval_metrics
from ..eval.zeroshot import class_embeddings
from ..interfaces import Embedder

RETRIEVAL = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
ZEROSHOT = "zeroshot_top1"
GATED = (*RETRIEVAL, ZEROSHOT)  # every metric the gate can hold; a report holds those its data allowed
LABELS = {ZEROSHOT: "zero-shot top-1"}
TOLERANCE = 1e-9  # a drop equal to the limit passes; float noise in a mean of hits is not a drop


@dataclass
class Measured:
    metrics: dict[str, float]
    image_emb: torch.Tensor  # (N_img, D) normalised
    text_emb: torch.Tensor  # (N_txt, D) normalised


def verification_set(embedder: Embedder, data: str, n: int, split: str = "test") -> RetrievalSet:
    """The images and captions both models are measured on: ``shapes`` (the world the model was trained on, as
    ``mmfusion eval retrieval`` builds it) or a folder with ``captions.jsonl``."""
    return retrieval_set(data, n, split, shapes_config_of(embedder))


@dataclass
class LabelledSet:
    """Class names, prompt templates and labelled images: the zero-shot part of the gate."""

    classes: list[str]
    templates: tuple[str, ...]
    groups: list[ZeroShotGroup]
    source: str

    @property
    def n(self) -> int:
        return sum(len(g.labels) for g in self.groups)


def labels_for(verify_data: str, labels: str | None) -> str | None:
    """Where the gate's labelled images come from: ``labels`` when given ('none' for no zero-shot part), else
    the verification data when it has labels (``shapes``, or a folder with a ``zeroshot/`` of class folders)."""
    if labels is not None:
        return None if labels == "none" else labels
    if verify_data == "shapes" or (Path(verify_data) / "zeroshot").is_dir():
        return verify_data
    return None


def labelled_set(embedder: Embedder, data: str | None, per_class: int) -> LabelledSet | None:
    """The labelled images both models classify: ShapesWorld's single objects for ``shapes``, class folders
    (``DATA/zeroshot/{seen,heldout}/<class>/``, as ``mmfusion data export`` writes them, or ``DATA/<class>/``)
    for a folder; None when ``data`` is None or ``per_class`` is 0."""
    from ..data.prompts import PHOTO_TEMPLATES, SHAPES_TEMPLATES

    if data is None or per_class <= 0:
        return None
    classes, groups, highlighted, source = zeroshot_groups(data, per_class, shapes_config_of(embedder))
    if len(classes) < 2:
        raise ValueError(f"{data}: zero-shot needs at least two class folders, found {classes or 'none'}")
    if data != "shapes":
        groups = [ZeroShotGroup(g.name, g.images[_first_per_class(g.labels, per_class)],
                                g.labels[_first_per_class(g.labels, per_class)]) for g in groups]  # fmt: skip
    templates = SHAPES_TEMPLATES if data == "shapes" or highlighted else PHOTO_TEMPLATES
    return LabelledSet(classes, tuple(templates), groups, source)


def _first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of at most ``per_class`` images of each class, in order."""
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels.tolist()):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= per_class:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def zeroshot_top1(embedder: Embedder, ls: LabelledSet) -> float:
    """Top-1 accuracy over every labelled image, with the prompt ensemble."""
    cls_emb = class_embeddings(embedder, ls.classes, ls.templates)
    hits = 0
    for g in ls.groups:
        pred = (embed_images(embedder, g.images, progress=False) @ cls_emb.t()).argmax(dim=1).numpy()
        hits += int((pred == g.labels).sum())
    return hits / max(ls.n, 1)


def measure(
    embedder: Embedder, ds: RetrievalSet, labelled: LabelledSet | None = None, ks: Sequence[int] = (1, 5, 10)
) -> Measured:
    """Recall@K both ways of one model on a verification set, and its zero-shot top-1 on ``labelled``."""
    texts = [c for caps in ds.captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps])
    img = embed_images(embedder, ds.images)
    txt = embed_texts(embedder, texts)
    metrics = retrieval_metrics(img, txt, text_image, ks)
    if labelled is not None:
        metrics[ZEROSHOT] = zeroshot_top1(embedder, labelled)
    return Measured(metrics, img, txt)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = (a.float() * b.float()).sum(-1)
    return {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)} if len(cos) else {}


def compare(before: Measured, after: Measured, max_drop: float) -> dict[str, Any]:
    """Per gated metric the drop (before - after); ``passed`` when none exceeds ``max_drop``."""
    drops = {k: round(before.metrics[k] - after.metrics[k], 6) for k in GATED if k in before.metrics}
    worst = max(drops, key=drops.get)
    failed = [k for k, d in drops.items() if d > max_drop + TOLERANCE]
    return {
        "max_drop": max_drop,
        "before": {k: before.metrics[k] for k in drops},
        "after": {k: after.metrics[k] for k in drops},
        "drops": drops,
        "worst": {"metric": worst, "drop": drops[worst]},
        "failed": failed,
        "passed": not failed,
        "cosine_to_before": {
            "images": _agreement(before.image_emb, after.image_emb),
            "texts": _agreement(before.text_emb, after.text_emb),
        },
    }


def plot_comparison(gate: dict[str, Any], path: str | Path, title: str) -> Path:
    """Grouped bars of each gated Recall@K before and after, the failed ones marked."""
    from ..eval.plots import _save, plt  # matplotlib (Agg) and the project's one way to write a figure

    names = list(gate["drops"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for offset, key, label in ((-0.2, "before", "before"), (0.2, "after", "after")):
        bars = ax.bar(x + offset, [gate[key][k] for k in names], 0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    for i, k in enumerate(names):
        if k in gate["failed"]:
            ax.annotate(f"-{gate['drops'][k]:.3f}", (i + 0.2, gate["after"][k]), xytext=(0, 12),
                        textcoords="offset points", ha="center", color="crimson", fontsize=8)  # fmt: skip
    ticks = [LABELS.get(k, k.replace("i2t_", "image→text ").replace("t2i_", "text→image ")) for k in names]
    ax.set_xticks(x, ticks, fontsize=7)
    ax.set_ylim(0, 1.15)
    verdict = "kept" if gate["passed"] else "REFUSED"
    ax.set_title(f"{title}: {verdict} (allowed drop {gate['max_drop']:g}, largest {gate['worst']['drop']:.3f})")
    ax.legend(frameon=False, fontsize=8, loc="upper left", ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The gate as a few lines: each metric before -> after, and the verdict."""
    gate = report["gate"]
    lines = [f"{report['mode']} on {report['verify']['data']}: max drop {gate['max_drop']:g}"]
    for k in gate["drops"]:
        mark = "  <- over the limit" if k in gate["failed"] else ""
        before, after = gate["before"][k], gate["after"][k]
        lines.append(f"  {k:13s} {before:.3f} -> {after:.3f} ({after - before:+.3f}){mark}")
    cos = gate["cosine_to_before"]
    if cos["images"]:
        img, txt = cos["images"], cos["texts"]
        lines.append(f"  cosine to the model before: images {img['mean']:.4f} (min {img['min']:.4f}), "
                     f"texts {txt['mean']:.4f} (min {txt['min']:.4f})")  # fmt: skip
    sizes = report.get("size_mb")
    if sizes:
        lines.append(f"  size {sizes['before']:.1f} MB -> {sizes['after']:.1f} MB")
    return lines
