"""Zero-shot classification with prompt ensembles (CLIP paper, section 3.1.4).

Each class name is put into several templates ("a photo of a {}."); the class embedding is the mean
of the normalised template embeddings, normalised again. An image is assigned the class whose
embedding is most similar. Works with any :class:`~mmfusion.interfaces.Embedder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..interfaces import Embedder
from .retrieval import embed_texts


def fill_template(template: str, label: str) -> str:
    """Put a label into a template, writing 'an' before a vowel where the template says 'a {}'."""
    if label[:1].lower() in "aeiou":
        template = (
            template.replace("a {}", "an {}") if template.startswith("a {}") else template.replace(" a {}", " an {}")
        )
    return template.format(label)


@torch.no_grad()
def class_embeddings(embedder: Embedder, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its normalised template embeddings."""
    if not templates:
        raise ValueError("give at least one prompt template, such as 'a photo of a {}.'")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt templates need a {{}} where the class name goes: {bad}")
    texts = [fill_template(t, c) for c in classes for t in templates]
    emb = embed_texts(embedder, texts).view(len(classes), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
        out[f"top{k}"] = float((top == labels[:, None]).any(dim=1).float().mean()) if len(labels) else float("nan")
    return out


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm
