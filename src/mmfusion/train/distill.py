"""A teacher for a CLIP run: its embeddings of each batch, and the loss that makes the student learn from them.

The student learns the teacher's *relations* (affinity mimicking, TinyCLIP: Wu et al., "TinyCLIP: CLIP
Distillation via Affinity Mimicking and Weight Inheritance", 2023): per image, the teacher's distribution over the
batch's texts, and per text its distribution over the images, which carries what the teacher knows about near
misses (the hard negatives included) that one-hot pair labels do not. Optionally the embeddings themselves
(regression on the cosine): directly when the widths are equal, else through a learned linear projection from the
student's width to the teacher's, one per modality (:class:`DistillLoss` owns it; it trains with the student and is
kept in the resumable checkpoints, never in the student's model, which stays an ordinary CLIP). Any Embedder
teaches: a native run, a pretrained CLIP/SigLIP, an ONNX export; it sees the batch as images and strings, through
its own preprocessing. A native CLIP teacher can also initialise the student (weight inheritance,
:mod:`mmfusion.train.inherit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..modules.losses import EmbeddingProjection, affinity_mimicking, embedding_regression
from .config import DistillConfig

log = logging.getLogger(__name__)
MAX_CACHED = 500_000  # embeddings kept per kind; past this the cache stops growing (the run goes on without it)


class Teacher:
    """The teacher model, frozen, with caches of what it already embedded.

    Args:
        cfg: the run's ``distill`` section (``cfg.teacher`` names the model).
        device: where it runs (the student's device).
        cache_images: whether an image's embedding may be reused by its dataset index (finite data without
            augmentation: the same index is the same pixels).
    """

    def __init__(self, cfg: DistillConfig, device: torch.device, cache_images: bool):
        from ..backends import load

        if not cfg.teacher:
            raise ValueError("distill.teacher names no model")
        self.cfg, self.device = cfg, device
        self.model = load(cfg.teacher, device=str(device))
        if isinstance(self.model, torch.nn.Module):
            self.model.eval().requires_grad_(False)
        self.name = getattr(self.model, "name", cfg.teacher)
        self._texts: dict[str, torch.Tensor] = {}
        self._images: dict[int, torch.Tensor] = {}
        self.cache_images = cfg.cache and cache_images
        self.hits = self.misses = 0

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, D) normalised teacher embeddings, from the cache where it has them."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._texts] if self.cfg.cache else list(texts)
        fresh = {}
        if todo:
            z = F.normalize(torch.as_tensor(np.asarray(self.model.encode_text(list(todo)))).float(), dim=-1).cpu()
            fresh = dict(zip(todo, z, strict=True))
            if self.cfg.cache and len(self._texts) < MAX_CACHED:
                self._texts.update(fresh)
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        return torch.stack([self._texts.get(t, fresh.get(t)) for t in texts]).to(self.device)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray, keys: Sequence[int] | None) -> torch.Tensor:
        """(B, D) normalised teacher embeddings of uint8 images (B, S, S, 3); ``keys`` (dataset indices) reuse
        the embeddings of images seen before when caching images is allowed."""
        use = self.cache_images and keys is not None
        todo = [i for i, k in enumerate(keys) if k not in self._images] if use else list(range(len(images)))
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            pil = [Image.fromarray(images[i]) for i in todo]
            z = F.normalize(torch.as_tensor(np.asarray(self.model.encode_image(pil))).float(), dim=-1).cpu()
            fresh = dict(zip(todo, z, strict=True))
            if use and len(self._images) < MAX_CACHED:
                self._images.update({keys[i]: fresh[i] for i in todo})
        self.hits += len(images) - len(todo)
        self.misses += len(todo)
        rows = [fresh[i] if i in fresh else self._images[keys[i]] for i in range(len(images))]
        return torch.stack(rows).to(self.device)


def distill_terms(cfg: DistillConfig, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                  t_image: torch.Tensor, t_text: torch.Tensor,
                  project: EmbeddingProjection | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The teacher's loss terms for a batch: ``affinity`` and (when weighted) ``embed``, unweighted.

    Args:
        image, text: the student's normalised embeddings (B, D) and (T, D).
        scale: the student's logit scale (used for both distributions unless ``cfg.temperature`` is set).
        t_image, t_text: the teacher's normalised embeddings of the same images and texts (B, D') and (T, D').
        project: the learned maps from D to D', needed for embedding regression when D != D'.
    """
    s = (1.0 / cfg.temperature) if cfg.temperature else scale.detach()
    terms = {"affinity": affinity_mimicking(s * image @ text.t(), s * t_image @ t_text.t())}
    if cfg.embed_weight:
        if project is not None:
            image, text = project("image", image), project("text", text)  # (B, D'), (T, D')
        elif image.shape[-1] != t_image.shape[-1]:
            raise ValueError(
                f"distill.embed_weight: the student's embeddings are {image.shape[-1]}-d, the teacher's "
                f"{t_image.shape[-1]}-d, and no projection was given: build the loss with DistillLoss, which learns "
                "one, or set distill.embed_weight=0 (affinity mimicking needs no match)"
            )
        terms["embed"] = (embedding_regression(image, t_image) + embedding_regression(text, t_text)) / 2
    return terms


class DistillLoss(nn.Module):
    """The teacher's terms and the weighted total, owning what they learn: the projection from the student's
    embedding width to the teacher's when embedding regression is on and the widths differ (equal widths regress
    directly, with no projection, so a student that copies its teacher starts at zero).

    It is not part of the student: the trainer optimises its parameters beside the model's and keeps them in the
    resumable checkpoints (``train_modules``), and the student's saved model holds none of them.

    Args:
        cfg: the run's ``distill`` section.
        student_dim, teacher_dim: the two embedding widths.
    """

    def __init__(self, cfg: DistillConfig, student_dim: int, teacher_dim: int):
        super().__init__()
        self.cfg = cfg
        need = bool(cfg.embed_weight) and student_dim != teacher_dim
        self.project = EmbeddingProjection(student_dim, teacher_dim) if need else None

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, t_image: torch.Tensor,
                t_text: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """The unweighted terms (see :func:`distill_terms`)."""
        return distill_terms(self.cfg, image, text, scale, t_image, t_text, self.project)


def combine(cfg: DistillConfig, contrastive: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weighted sum the student minimises."""
    total = cfg.contrastive_weight * contrastive + cfg.affinity_weight * terms["affinity"]
    if "embed" in terms:
        total = total + cfg.embed_weight * terms["embed"]
    return total
