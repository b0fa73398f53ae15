"""Ready-made uses of any Embedder: zero-shot labels with prompt ensembles, concept flags, the best caption.

Works the same with a native checkpoint or a pretrained CLIP/SigLIP::

    clf = ZeroShotClassifier(mmfusion.load("hf:openai/clip-vit-base-patch32"), ["cat", "dog", "car"])
    clf.classify(["photo.jpg"], k=2)   # [[Prediction('cat', 0.91), Prediction('dog', 0.07)]]

Label embeddings are the normalised mean over prompt templates ("a photo of a {}.", ...), computed once
and cached: in memory, and on disk (``~/.cache/mmfusion/labels``, keyed by the model's weights, the labels
and the templates) so a thousand labels times eighty prompts are embedded once per model, not per call.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.prompts import read_templates
from ..interfaces import Embedder
from ..utils.io import atomic_write_bytes

if TYPE_CHECKING:  # torch is imported where a model needs it: /classify of an ONNX export runs without it
    import torch

DEFAULT_CACHE = Path(os.environ.get("MMFUSION_CACHE", "~/.cache/mmfusion")).expanduser() / "labels"


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # probability (softmax over the labels, or a per-label sigmoid for SigLIP-style models)


def read_labels(spec: str | Sequence[str]) -> list[str]:
    """Labels from a list, a file (one per line, ``#`` comments), or a comma-separated string."""
    if not isinstance(spec, str):
        labels = [str(x).strip() for x in spec]
    elif Path(spec).expanduser().is_file():
        lines = Path(spec).expanduser().read_text(encoding="utf-8").splitlines()
        labels = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        labels = [x.strip() for x in spec.split(",")]
    labels = [x for x in labels if x]
    if not labels:
        raise ValueError("no labels given: pass a list, a file with one label per line, or 'cat,dog,car'")
    dup = sorted(x for x, n in Counter(labels).items() if n > 1)
    if dup:
        raise ValueError(f"labels repeat: {dup}; each label must be given once")
    return labels


def _fingerprint(embedder: Embedder) -> str:
    from ..backends import model_fingerprint  # the same identity the index records

    return model_fingerprint(embedder)


def probabilities(embedder: Embedder, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(N_images, N_texts) scores the way the model was trained to give them: its own ``probabilities`` when
    it has them (softmax for CLIP, sigmoid for SigLIP), else a softmax of 100 x cosine (CLIP's scale)."""
    own = getattr(embedder, "probabilities", None)
    if callable(own):
        return own(image_emb, text_emb).float().cpu()
    return (100.0 * image_emb.float().cpu() @ text_emb.float().cpu().T).softmax(dim=-1)


def probabilities_np(embedder: Embedder, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """:func:`probabilities` on NumPy arrays, through torch only when the process has it loaded (a torch model);
    an ONNX export without torch scores in NumPy itself."""
    import sys

    if "torch" in sys.modules:
        import torch

        return probabilities(embedder, torch.from_numpy(image_emb), torch.from_numpy(text_emb)).numpy()
    own = getattr(embedder, "probabilities", None)
    if callable(own):
        return np.asarray(own(image_emb, text_emb), dtype=np.float32)
    logits = 100.0 * image_emb @ text_emb.T
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def is_sigmoid(embedder: Embedder) -> bool:
    """Whether the model scores each label on its own (SigLIP) rather than labels against each other."""
    if getattr(embedder, "model_type", None) == "siglip":
        return True
    logit = getattr(embedder, "logit", None)
    return getattr(logit, "bias", None) is not None


class ZeroShotClassifier:
    """Labels images with the labels whose prompt-ensemble embedding they match best.

    Args:
        embedder: any :class:`~mmfusion.interfaces.Embedder`.
        labels: the label set (list, file, or 'a,b,c').
        templates: prompt templates with ``{}`` (default: 16 photo prompts); ``("{}",)`` uses labels as written.
        cache_dir: where label embeddings are kept between runs; None to keep them in memory only.
    """

    def __init__(
        self,
        embedder: Embedder,
        labels: str | Sequence[str],
        templates: str | Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
    ):
        self.embedder = embedder
        self.labels = read_labels(labels)
        self.templates = read_templates(templates)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cached = False  # whether the label embeddings came from the disk cache
        self._label_emb: torch.Tensor | None = None

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps({"model": _fingerprint(self.embedder), "labels": self.labels, "templates": self.templates})
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"

    @property
    def label_embeddings(self) -> torch.Tensor:
        """(L, D) normalised label embeddings (computed once, then cached)."""
        if self._label_emb is None:
            path = self._cache_path()
            if path is not None and path.is_file():
                try:
                    arr = np.load(path, allow_pickle=False)
                    if arr.shape == (len(self.labels), self.embedder.embed_dim):
                        import torch

                        self._label_emb, self.cached = torch.from_numpy(arr), True
                except (OSError, ValueError):
                    pass  # a damaged cache file is recomputed and rewritten
            if self._label_emb is None:
                from ..eval.zeroshot import class_embeddings

                self._label_emb = class_embeddings(self.embedder, self.labels, self.templates).float().cpu()
                if path is not None:
                    self._save(path, self._label_emb.numpy())
        return self._label_emb

    @staticmethod
    def _save(path: Path, arr: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass  # a read-only cache costs time, never the result

    def scores(self, images) -> torch.Tensor:
        """(N, L) probabilities for images (PIL images, paths, or a tensor the embedder accepts)."""
        img = _encode_images(self.embedder, images)
        return probabilities(self.embedder, img, self.label_embeddings)

    def classify(self, images, k: int = 5) -> list[list[Prediction]]:
        """Per image, the ``k`` best labels with their probabilities, best first."""
        probs = self.scores(images)
        k = max(1, min(k, len(self.labels)))
        top = probs.topk(k, dim=-1)
        return [
            [Prediction(self.labels[j], float(p)) for p, j in zip(vals, idx, strict=True)]
            for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def flag(self, images, threshold: float | None = None) -> list[list[Prediction]]:
        """Per image, every label scored at or above ``threshold`` (concept moderation), highest first.

        The score is the per-label sigmoid for models trained with it (SigLIP; default threshold 0.5) and the
        cosine similarity of image and label otherwise (default 0.3, the value of the design notes: cosine is
        not a probability, so pick the threshold on examples of your own with :meth:`similarities`).
        """
        sigmoid = is_sigmoid(self.embedder)
        threshold = (0.5 if sigmoid else 0.3) if threshold is None else threshold
        img = _encode_images(self.embedder, images)
        s = probabilities(self.embedder, img, self.label_embeddings) if sigmoid else img @ self.label_embeddings.T
        out = []
        for row in s.tolist():
            hits = [Prediction(lab, v) for lab, v in zip(self.labels, row, strict=True) if v >= threshold]
            out.append(sorted(hits, key=lambda p: -p.score))
        return out

    def similarities(self, images) -> torch.Tensor:
        """(N, L) cosine similarities of images and labels."""
        return _encode_images(self.embedder, images) @ self.label_embeddings.T


def _encode_images(embedder: Embedder, images) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    from ..data.images import load_image

    if isinstance(images, torch.Tensor):
        return embedder.encode_image(images).float().cpu()
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        images = [images]
    pil = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
    with torch.inference_mode():
        return F.normalize(embedder.encode_image(pil).float().cpu(), dim=-1)


def best_caption(embedder: Embedder, image, candidates: Sequence[str]) -> list[Prediction]:
    """Candidate captions ranked for one image, best first; scores are cosine similarities."""
    if not candidates:
        raise ValueError("give at least one candidate caption")
    import torch
    import torch.nn.functional as F

    img = _encode_images(embedder, [image])
    with torch.inference_mode():
        txt = F.normalize(embedder.encode_text(list(candidates)).float().cpu(), dim=-1)
    sims = (img @ txt.T)[0].tolist()
    return sorted((Prediction(c, s) for c, s in zip(candidates, sims, strict=True)), key=lambda p: -p.score)


def moderate(
    embedder: Embedder, images, concepts: str | Sequence[str], threshold: float | None = None, templates=None
) -> list[list[Prediction]]:
    """Concepts found in each image (score at or above ``threshold``); see :meth:`ZeroShotClassifier.flag`."""
    return ZeroShotClassifier(embedder, concepts, templates, cache_dir=None).flag(images, threshold)
