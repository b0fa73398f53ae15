"""The quality gate of a quantised model: retrieval Recall@K of the model before and after, on the user's data, and
a refusal when any of them dropped by more than allowed.

Both models embed the same images and texts (ShapesWorld's test split as the model was trained on it, or a
folder in mmfusion's caption format); the metrics are the project's own (:mod:`mmfusion.eval.retrieval`). The
report also says how close the two models' embeddings are (cosine of each image's and text's two vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval.report import RetrievalSet, retrieval_set, shapes_config_of
from ..eval.retrieval import embed_images, embed_texts, retrieval_metrics
from ..interfaces import Embedder

GATED = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
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


def measure(embedder: Embedder, ds: RetrievalSet, ks: Sequence[int] = (1, 5, 10)) -> Measured:
    """Recall@K both ways (and ranks) of one model on a verification set."""
    texts = [c for caps in ds.captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps])
    img = embed_images(embedder, ds.images)
    txt = embed_texts(embedder, texts)
    return Measured(retrieval_metrics(img, txt, text_image, ks), img, txt)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = (a.float() * b.float()).sum(-1)
    return {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)} if len(cos) else {}


def compare(before: Measured, after: Measured, max_drop: float) -> dict[str, Any]:
    """Per gated metric the drop (before - after); ``passed`` when none exceeds ``max_drop``."""
    drops = {k: round(before.metrics[k] - after.metrics[k], 6) for k in GATED}
    worst = max(drops, key=drops.get)
    failed = [k for k, d in drops.items() if d > max_drop + TOLERANCE]
    return {
        "max_drop": max_drop,
        "before": {k: before.metrics[k] for k in GATED},
        "after": {k: after.metrics[k] for k in GATED},
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
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from ..utils.io import atomic_write_bytes

    names = list(GATED)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for offset, key, label in ((-0.2, "before", "before"), (0.2, "after", "after")):
        bars = ax.bar(x + offset, [gate[key][k] for k in names], 0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    for i, k in enumerate(names):
        if k in gate["failed"]:
            ax.annotate(f"-{gate['drops'][k]:.3f}", (i + 0.2, gate["after"][k]), xytext=(0, 12),
                        textcoords="offset points", ha="center", color="crimson", fontsize=8)  # fmt: skip
    ax.set_xticks(x, [k.replace("i2t_", "image→text ").replace("t2i_", "text→image ") for k in names], fontsize=7)
    ax.set_ylim(0, 1.15)
    verdict = "kept" if gate["passed"] else "REFUSED"
    ax.set_title(f"{title}: {verdict} (allowed drop {gate['max_drop']:g}, largest {gate['worst']['drop']:.3f})")
    ax.legend(frameon=False, fontsize=8, loc="upper left", ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The gate as a few lines: each metric before -> after, and the verdict."""
    gate = report["gate"]
    lines = [f"{report['mode']} on {report['verify']['data']}: max drop {gate['max_drop']:g}"]
    for k in GATED:
        mark = "  <- over the limit" if k in gate["failed"] else ""
        before, after = gate["before"][k], gate["after"][k]
        lines.append(f"  {k:9s} {before:.3f} -> {after:.3f} ({after - before:+.3f}){mark}")
    cos = gate["cosine_to_before"]
    if cos["images"]:
        img, txt = cos["images"], cos["texts"]
        lines.append(f"  cosine to the model before: images {img['mean']:.4f} (min {img['min']:.4f}), "
                     f"texts {txt['mean']:.4f} (min {txt['min']:.4f})")  # fmt: skip
    sizes = report.get("size_mb")
    if sizes:
        lines.append(f"  size {sizes['before']:.1f} MB -> {sizes['after']:.1f} MB")
    return lines
