"""Contrastive losses as pure functions, and the small module that owns the learnable temperature.

- :func:`clip_loss`: symmetric InfoNCE of CLIP (Radford et al., 2021).
- :func:`siglip_loss`: the pairwise sigmoid loss of SigLIP (Zhai et al., 2023).
- :func:`triplet_loss`: hinge loss with the hardest in-batch negatives of VSE++ (Faghri et al., 2018).
- :func:`affinity_mimicking` and :func:`embedding_regression`: a student learning from a teacher's similarities
  and embeddings (distillation); :class:`EmbeddingProjection` owns the learned map between their widths.

All take L2-normalised image embeddings ``(B, D)`` and text embeddings ``(T, D)``. Without a mask, B
equals T and row ``i`` of each side is a matching pair. A ``positives`` mask ``(B, T)`` says which
pairs match instead: several captions per image, or two images in a batch that one caption
describes. Every image needs at least one match; a text with none is a pure negative (a hard negative
caption, as in NegCLIP) and takes part only in the image-to-text direction. Unmarked pairs are negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # scalar
    i2t_acc: torch.Tensor  # fraction of images whose best-scoring text is a positive
    t2i_acc: torch.Tensor  # fraction of texts whose best-scoring image is a positive


def positives_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B,) ids (equal id = same caption) -> (B, B) bool mask of matching pairs."""
    return ids[:, None] == ids[None, :]


def _check(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(
            f"expected (B, D) image and (T, D) text embeddings, got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    B, T = image.shape[0], text.shape[0]
    if positives is None:
        if B != T:
            raise ValueError(f"{B} images and {T} texts: say which match with a (B, T) positives mask")
        return torch.eye(B, dtype=torch.bool, device=image.device)
    if positives.shape != (B, T) or not bool(positives.any(dim=1).all()):
        raise ValueError(f"positives must be a ({B}, {T}) bool mask with a match in every row (image)")
    return positives


def _accuracies(logits: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        rows = torch.arange(logits.shape[0], device=logits.device)
        cols = torch.arange(logits.shape[1], device=logits.device)[pos.any(dim=0)]  # texts that have an image
        i2t = pos[rows, logits.argmax(dim=1)].float().mean()
        t2i = pos[logits[:, cols].argmax(dim=0), cols].float().mean()
    return i2t, t2i


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, positives: torch.Tensor | None = None
) -> ContrastiveOutput:
    """Symmetric InfoNCE: cross-entropy over texts for each image and over images for each text.

    With several positives in a row, the loss is ``-log`` of the total probability given to them
    (a caption repeated in the batch is not pushed away from its own image).

    Args:
        image, text: (B, D) and (T, D) normalised embeddings.
        logit_scale: the inverse temperature (already exponentiated), scalar.
        positives: (B, T) mask of matching pairs; without it, row i of each side is the only match.
    """
    pos = _check(image, text, positives)
    logits = logit_scale * image @ text.t()  # (B, T)
    if positives is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    else:
        neg_inf = torch.finfo(logits.dtype).min
        pos_logits = logits.masked_fill(~pos, neg_inf)
        i2t = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)  # (B,)
        has_image = pos.any(dim=0)  # (T,) pure negatives have no image to retrieve
        t2i = torch.logsumexp(logits[:, has_image], dim=0) - torch.logsumexp(pos_logits[:, has_image], dim=0)
        loss = (i2t.mean() + t2i.mean()) / 2
    return ContrastiveOutput(loss, *_accuracies(logits, pos))


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    positives: torch.Tensor | None = None,
) -> ContrastiveOutput:
    """Sigmoid loss: every (image, text) pair is an independent binary match / no-match decision.

    The sum over all B x T pairs is divided by the number of images B, as in the paper.
    """
    pos = _check(image, text, positives)
    logits = logit_scale * image @ text.t() + logit_bias  # (B, T)
    signs = pos.to(logits.dtype) * 2 - 1  # +1 for matches, -1 otherwise
    loss = -F.logsigmoid(signs * logits).sum() / logits.shape[0]
    return ContrastiveOutput(loss, *_accuracies(logits, pos))


def triplet_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    margin: float = 0.2,
    hardest: bool = True,
    positives: torch.Tensor | None = None,
) -> ContrastiveOutput:
    """Hinge on cosine similarity: each positive must beat negatives by ``margin``, in both directions.

    Args:
        hardest: use only the hardest negative of each anchor (VSE++); otherwise the mean over negatives.
    """
    if image.shape[0] != text.shape[0]:
        raise ValueError("the triplet loss pairs row i of images with row i of texts: give one caption per image")
    pos = _check(image, text, positives)
    sim = image @ text.t()  # (B, B)
    diag = sim.diagonal()
    cost_txt = (margin + sim - diag[:, None]).clamp(min=0).masked_fill(pos, 0)  # image anchors, text negatives
    cost_img = (margin + sim - diag[None, :]).clamp(min=0).masked_fill(pos, 0)  # text anchors, image negatives
    if hardest:
        loss = (cost_txt.max(dim=1).values.mean() + cost_img.max(dim=0).values.mean()) / 2
    else:
        n_neg = (~pos).sum(dim=1).clamp(min=1)
        loss = (cost_txt.sum(dim=1) / n_neg).mean() / 2 + (cost_img.sum(dim=0) / n_neg).mean() / 2
    return ContrastiveOutput(loss, *_accuracies(sim, pos))


def affinity_mimicking(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Affinity mimicking (TinyCLIP, Wu et al., 2023): the student's image->text distributions over a batch's
    texts (rows of its logits, (B, T)) and text->image distributions over its images (columns) learn the
    teacher's, by KL(teacher || student) averaged over the two directions."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    i2t = F.kl_div(student.log_softmax(1), teacher.log_softmax(1), log_target=True, reduction="batchmean")
    t2i = F.kl_div(student.t().log_softmax(1), teacher.t().log_softmax(1), log_target=True, reduction="batchmean")
    return (i2t + t2i) / 2


def embedding_regression(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - the mean cosine of each row of ``student`` (N, D) with the same row of ``teacher`` (N, D): 0 when every
    embedding points the teacher's way (neither needs to be normalised)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ")
    return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()


class EmbeddingProjection(nn.Module):
    """Learned linear maps from a student's embedding width to a teacher's, one per modality, for embedding
    regression between spaces of different widths (as the distillation of TinyCLIP and CLIP-KD do with a fitted
    projection). Each starts as the identity on the leading coordinates (``eye(teacher_dim, student_dim)``): no
    random draw, and the leading coordinates are those that weight inheritance copies from the teacher.

    Args:
        student_dim, teacher_dim: the two widths.
        modalities: one map per name (``image``, ``text``).
    """

    def __init__(self, student_dim: int, teacher_dim: int, modalities: tuple[str, ...] = ("image", "text")):
        super().__init__()
        self.maps = nn.ModuleDict({m: nn.Linear(student_dim, teacher_dim, bias=False) for m in modalities})
        with torch.no_grad():
            for lin in self.maps.values():
                lin.weight.copy_(torch.eye(teacher_dim, student_dim))  # (D_teacher, D_student)

    def forward(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        """(N, D_student) -> (N, D_teacher)."""
        return self.maps[modality](z)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_true)^gamma, so confident, easy examples
    count less and rare or hard ones more; ``gamma=0`` is (weighted) cross-entropy. Mean over the batch
    (weighted mean when class ``weight`` is given, as ``F.cross_entropy`` does)."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    loss = -((1 - logp.exp()).clamp_min(0) ** gamma) * logp
    if weight is None:
        return loss.mean()
    w = weight.to(loss.dtype)[targets]
    return (loss * w).sum() / w.sum().clamp_min(1e-12)


class LogitScale(nn.Module):
    """Owns the temperature (in log space, clamped) and, for SigLIP, the logit bias.

    Args:
        init: initial log of the logit scale, ln(1/0.07) for CLIP, ln(10) for SigLIP.
        max_log: the clamp, ln(100), so the temperature never falls below 0.01.
        learnable: a parameter if True, a fixed buffer if False.
        init_bias: SigLIP's bias (-10); None for no bias.
    """

    def __init__(
        self,
        init: float = math.log(1 / 0.07),
        max_log: float = math.log(100),
        learnable: bool = True,
        init_bias: float | None = None,
    ):
        super().__init__()
        self.max_log = max_log
        value = torch.tensor(float(init))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.bias = nn.Parameter(torch.tensor(float(init_bias))) if init_bias is not None else None

    def forward(self) -> torch.Tensor:
        """The logit scale exp(clamp(log_scale, max=max_log))."""
        return self.log_scale.clamp(max=self.max_log).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the stored value inside the clamp, so the gradient never stops at the boundary for good."""
        self.log_scale.clamp_(max=self.max_log)
