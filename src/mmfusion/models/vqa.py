"""Visual question answering by classification over an answer vocabulary.

Image tokens come from the CLIP family's ViT; question tokens from a small bidirectional Transformer. Each
fusion layer lets the question tokens attend to each other (a pre-norm block) and then to the image tokens
(the cross-modal attention block of :mod:`mmfusion.modules.fusions`), as in the co-attention models of VQA
(ViLBERT, LXMERT) with the image side kept fixed. The question tokens, mean-pooled over the real ones, go
through an MLP to one score per answer. Implements :class:`mmfusion.interfaces.Answerer`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from ..config import field
from ..data.images import CLIP_MEAN, CLIP_STD, ImageTransform
from ..data.tokenizer import PAD_ID, Tokenizer
from ..interfaces import GenerationOptions
from ..modules.encoders import VisionConfig, VisionTransformer
from ..modules.fusions import CrossModalAttentionBlock
from ..modules.layers import Block
from .captioner import no_system_prompt


@dataclass
class QuestionConfig:
    """The question encoder: token embeddings and a bidirectional Transformer."""

    vocab_size: int = field(1024, "rows of the token embedding (at least the tokenizer's vocabulary)")
    context_length: int = field(32, "most tokens in a question, <sot> and <eot> included")
    width: int = field(128, "token width (also the width of the fusion layers)")
    layers: int = field(1, "self-attention blocks before the fusion layers")
    heads: int = field(4, "attention heads")
    mlp_ratio: float = field(2.0, "hidden width of the MLPs as a multiple of width")
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = field("gelu", "MLP activation")


@dataclass
class VQAConfig:
    """A classifying VQA model."""

    vision: VisionConfig = field(factory=VisionConfig, help="image encoder (a ViT; the CLIP family's)")
    vision_embed_dim: int = field(128, "the ViT's projection width (kept so CLIP image towers load as they are)")
    question: QuestionConfig = field(factory=QuestionConfig, help="question encoder")
    fusion_layers: int = field(2, "layers of question self-attention + cross-attention to the image")
    answers: list[str] = field(factory=list, help="the answer vocabulary (set from the training data)")
    dropout: float = field(0.1, "dropout before the answer classifier")
    freeze_vision: bool = field(False, "keep the image encoder's weights fixed while training")
    image_mean: tuple[float, ...] = field(CLIP_MEAN, "per-channel mean for image normalisation")
    image_std: tuple[float, ...] = field(CLIP_STD, "per-channel std for image normalisation")


class VQAModel(nn.Module):
    """(image, question) -> scores over ``cfg.answers``."""

    family = "vqa"

    def __init__(self, cfg: VQAConfig, tokenizer: Tokenizer | None = None, name: str = "vqa"):
        super().__init__()
        if not cfg.answers:
            raise ValueError("a VQA model needs its answer vocabulary: set cfg.answers (training sets it from data)")
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name
        q = cfg.question
        self.visual = VisionTransformer(cfg.vision, cfg.vision_embed_dim)
        self.token_embed = nn.Embedding(q.vocab_size, q.width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(q.context_length, q.width))
        self.encoder = nn.ModuleList(Block(q.width, q.heads, q.mlp_ratio, q.act) for _ in range(q.layers))
        self.self_blocks = nn.ModuleList(Block(q.width, q.heads, q.mlp_ratio, q.act) for _ in range(cfg.fusion_layers))
        self.cross_blocks = nn.ModuleList(
            CrossModalAttentionBlock(q.width, q.heads, q.mlp_ratio, context_dim=cfg.vision.width)
            for _ in range(cfg.fusion_layers)
        )
        self.ln = nn.LayerNorm(q.width)
        self.head = nn.Sequential(nn.Linear(q.width, 2 * q.width), nn.GELU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(2 * q.width, len(cfg.answers)))  # fmt: skip
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if cfg.freeze_vision:
            self.visual.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(self.cfg.vision.image_size, self.cfg.image_mean, self.cfg.image_std)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Answer logits (Q, answers) for preprocessed images (B, 3, H, W) and question ids (Q, L).

        Question ``q`` is about image ``image_index[q]`` (default: question i about image i, Q == B). Each
        image is encoded once however many questions it has: training asks several of each image this way."""
        if image_index is None and tokens.shape[0] != images.shape[0]:
            raise ValueError(f"{tokens.shape[0]} questions for {images.shape[0]} images: pass image_index")
        L = int((tokens != PAD_ID).sum(dim=1).max())
        tokens = tokens[:, :L]
        real = tokens != PAD_ID  # (B, L)
        mask = real[:, None, None, :]  # (B, 1, 1, L): attend to real tokens only
        if self.cfg.freeze_vision:
            with torch.no_grad():
                image = self.visual.forward_features(images)
        else:
            image = self.visual.forward_features(images)  # (B, 1 + N, Wv)
        if image_index is not None:
            image = image[image_index]  # (Q, 1 + N, Wv)
        x = self.token_embed(tokens) + self.pos_embed[:L]
        for block in self.encoder:
            x = block(x, mask=mask)
        for self_block, cross in zip(self.self_blocks, self.cross_blocks, strict=True):
            x = cross(self_block(x, mask=mask), image)
        pooled = (self.ln(x) * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)

    @property
    def answer_vocabulary(self) -> list[str]:
        """The answers :meth:`answer` chooses from (it generates nothing, so generation options do not apply)."""
        return list(self.cfg.answers)

    def answer_ids(self, answers: Sequence[str]) -> torch.Tensor:
        index = {a: i for i, a in enumerate(self.cfg.answers)}
        unknown = [a for a in answers if a not in index]
        if unknown:
            raise ValueError(f"answers {unknown[:5]} are not in the model's vocabulary of {len(index)}")
        return torch.tensor([index[a] for a in answers], dtype=torch.long)

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        from ..data.images import load_image

        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self.transform(pil).to(self.device)

    @torch.no_grad()
    def scores(self, images, questions: str | Sequence[str]) -> torch.Tensor:
        """Softmax over the answers (B, answers) for each (image, question) pair."""
        if self.tokenizer is None:
            raise RuntimeError(f"VQA model {self.name!r} has no tokenizer; load a trained checkpoint")
        items = images if isinstance(images, (list, tuple, torch.Tensor)) else [images]
        qs = [questions] if isinstance(questions, str) else list(questions)
        if len(qs) == 1 and len(items) > 1:
            qs = qs * len(items)
        if len(items) == 1 and len(qs) > 1 and not isinstance(items, torch.Tensor):
            items = list(items) * len(qs)
        if len(qs) != len(items):
            raise ValueError(f"{len(qs)} questions for {len(items)} images: give one per image, or one for all")
        was_training = self.training
        self.eval()
        try:
            return self(self._pixels(items), self.tokenizer.encode(qs).to(self.device)).float().softmax(-1).cpu()
        finally:
            self.train(was_training)

    def answer(self, images, questions: str | Sequence[str], **options: Any) -> list[str]:
        """The most likely answer for each (image, question) pair; one question may be asked of every image.
        Generation options are checked and ignored, for the interface's sake (an answer is chosen, not generated);
        a system prompt is refused."""
        no_system_prompt(self.name, options)
        GenerationOptions.parse(options)
        return [self.cfg.answers[i] for i in self.scores(images, questions).argmax(-1).tolist()]

    def stream_answer(self, image, question: str, **options: Any) -> Iterator[str]:
        """The answer in one piece (a classifier has no partial answers)."""
        yield self.answer([image], question, **options)[0]
