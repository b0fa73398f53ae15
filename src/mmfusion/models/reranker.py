"""A cross-attention re-ranker: one match score per (image, caption) pair, for the top-K of a CLIP search.

A dual encoder embeds an image and a caption apart and compares two vectors, so "a red circle left of a blue
square" and "a blue circle left of a red square" can land on the same point (a bag of words; Yuksekgonul et al.,
ICLR 2023). A cross-encoder reads both at once: here, as in BLIP's image-text matching head (Li et al., 2022) and
ALBEF's (Li et al., 2021), the caption's tokens attend to the image's patch tokens in a few decoder blocks
(self-attention over the words, cross-attention to the patches, an MLP), and the words' states (or the state at
``<eot>``, as BLIP reads it) are read out as a score. Too slow to rank a whole collection, it re-ranks the few
images a CLIP search returns first.

The image patches and caption token features come from a trained CLIP (``init.from_clip``), kept frozen by
default, so the re-ranker is a small head over features the CLIP already computes. The score is the head's
output, plus a word-patch alignment term (FILIP, Yao et al., 2021: each word's best cosine over the patches in a
learned space, averaged over the words: a direct path for "is there a *red* circle here"), plus a learned multiple
of the CLIP's own logit. The head's last layer starts at zero, so without the alignment term an untrained
re-ranker ranks exactly as its CLIP does and training learns a correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import field
from ..data.images import ImageTransform
from ..data.tokenizer import Tokenizer
from ..modules.decoder import DecoderBlock
from .clip import CLIP, CLIPConfig


@dataclass
class RerankerConfig:
    """A cross-attention head over a CLIP's patch and token features."""

    clip: CLIPConfig = field(factory=CLIPConfig, help="the CLIP whose towers give the features (init.from_clip)")
    width: int = field(96, "width of the cross-attention blocks")
    layers: int = field(2, "blocks: self-attention over the caption, cross-attention to the patches, MLP")
    heads: int = field(4, "attention heads (must divide width)")
    mlp_ratio: float = field(2.0, "hidden width of the MLP as a multiple of width")
    freeze_clip: bool = field(True, "keep the CLIP's towers fixed (train the head only: cheaper, keeps its features)")
    clip_prior: bool = field(True, "add a learned multiple of the CLIP's own logit to the head's score")
    align: float = field(
        5.0,
        "initial weight of a word-patch alignment term (FILIP, Yao et al., 2021): each word's best cosine over the "
        "patches, averaged over the words, in a learned space; 0 for none",
    )
    align_dim: int = field(64, "width of the word-patch alignment space")
    pool: Literal["tokens", "eot"] = field(
        "tokens",
        "read the score from the mean of the caption's token states (each word's grounding gets its own gradient: "
        "learns in far fewer steps) or from the <eot> state alone (BLIP's readout)",
    )


@dataclass
class ImageMemory:
    """What the head reads of a batch of images, computed once per image."""

    tokens: torch.Tensor  # (B, 1 + N, width): class token and patches, projected
    embeds: torch.Tensor  # (B, D): the CLIP's normalised image embeddings


@dataclass
class TextFeatures:
    """What the head reads of a batch of captions."""

    tokens: torch.Tensor  # (T, L, width): the CLIP text tower's token features, projected (trimmed after <eot>)
    eot: torch.Tensor  # (T,) position of each caption's <eot>
    embeds: torch.Tensor  # (T, D): the CLIP's normalised text embeddings


class PairScoring:
    """Scoring over memories, for any re-ranker with ``encode_images``, ``encode_texts`` and ``score_pairs`` (the
    cross-attention :class:`Reranker`, a captioner's likelihood :class:`~.caption_ranker.CaptionRanker`)."""

    score_chunk = 4096  # pairs scored per pass by score_memory

    @torch.no_grad()
    def score(self, text: str, images: torch.Tensor | Sequence[Image.Image] | ImageMemory) -> torch.Tensor:
        """(K,) scores of one caption against K images (preprocessed (K, 3, H, W), PIL images, or their memory)."""
        memory = images if isinstance(images, ImageMemory) else self.encode_images(images)
        feats = self.encode_texts([text])
        idx = torch.arange(len(memory.tokens), device=self.device)
        return self.score_pairs(memory, feats, idx, torch.zeros_like(idx)).float().cpu()

    @torch.no_grad()
    def score_memory(self, memory: ImageMemory, texts: TextFeatures, pairs: torch.Tensor, chunk: int | None = None):
        """(P,) scores of ``pairs`` (P, 2) rows of (image, text) over memories already computed, in chunks."""
        chunk = chunk or self.score_chunk
        out = [self.score_pairs(memory, texts, p[:, 0], p[:, 1]) for p in pairs.to(self.device).split(chunk)]
        return torch.cat(out).float().cpu() if out else torch.zeros(0)


def _projection(d_in: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.LayerNorm(width))


class Reranker(PairScoring, nn.Module):
    """(image, caption) -> match score, higher for a better match.

    Args:
        cfg: the architecture (``cfg.clip`` the CLIP's).
        tokenizer: the CLIP's tokenizer (saved with the model).
        name: a label for reports.
    """

    family = "reranker"

    def __init__(self, cfg: RerankerConfig, tokenizer: Tokenizer | None = None, name: str = "reranker"):
        super().__init__()
        self.cfg, self.name = cfg, name
        if tokenizer is not None:
            tokenizer.context_length = cfg.clip.text.context_length
        self.tokenizer = tokenizer
        self.clip = CLIP(cfg.clip, tokenizer, name)
        self.image_proj = _projection(cfg.clip.vision.width, cfg.width)
        self.text_proj = _projection(cfg.clip.text.width, cfg.width)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, "gelu") for _ in range(cfg.layers)
        )
        self.ln_out = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 1)
        nn.init.zeros_(self.head.weight)  # untrained, the score is the CLIP's logit
        nn.init.zeros_(self.head.bias)
        if cfg.align:
            self.align_text = nn.Linear(cfg.width, cfg.align_dim)
            self.align_image = nn.Linear(cfg.width, cfg.align_dim)
            self.align_weight = nn.Parameter(torch.tensor(float(cfg.align)))
        self.clip_weight = nn.Parameter(torch.tensor(1.0 if cfg.clip_prior else 0.0), requires_grad=cfg.clip_prior)
        if cfg.freeze_clip:
            self.clip.requires_grad_(False)

    @classmethod
    def from_clip(cls, clip: CLIP, cfg: RerankerConfig | None = None, name: str = "reranker") -> Reranker:
        """A re-ranker over a trained CLIP's towers (load it with :func:`mmfusion.load` first)."""
        if getattr(clip, "family", None) != "clip":
            raise ValueError(f"{getattr(clip, 'name', clip)!r} is not a CLIP model; a re-ranker needs one")
        cfg = cfg or RerankerConfig()
        cfg.clip = clip.cfg
        model = cls(cfg, clip.tokenizer, name)
        model.clip.load_state_dict(clip.state_dict())
        return model

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def transform(self) -> ImageTransform:
        return self.clip.transform

    def train(self, mode: bool = True) -> Reranker:
        super().train(mode)
        if self.cfg.freeze_clip:
            self.clip.eval()  # a frozen tower stays as it was measured
        return self

    def _towers(self):
        return torch.no_grad() if self.cfg.freeze_clip else torch.enable_grad()

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.clip.tokenize(texts)

    def encode_images(self, images: torch.Tensor | Sequence[Image.Image]) -> ImageMemory:
        """Preprocessed images (B, 3, H, W), or PIL images -> their memory for the head."""
        x = images if isinstance(images, torch.Tensor) else self.transform(images)
        with self._towers():
            tokens = self.clip.visual.forward_features(x.to(self.device))  # (B, 1 + N, Wv)
            embeds = F.normalize(self.clip.visual.forward_head(tokens), dim=-1)  # (B, D)
        return ImageMemory(self.image_proj(tokens), embeds)

    def encode_texts(self, texts: torch.Tensor | str | Sequence[str]) -> TextFeatures:
        """Token ids (T, L), or strings -> their features for the head."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.clip.tokenize(texts)
        tokens = tokens.to(self.device)
        text = self.clip.text
        eot = text.eot_index(tokens)  # (T,)
        tokens = tokens[:, : int(eot.max()) + 1] if len(tokens) else tokens  # causal: nothing after <eot> counts
        with self._towers():
            feats = text.forward_features(tokens)  # (T, L, Wt)
            embeds = F.normalize(text.forward_head(feats, tokens), dim=-1)  # (T, D)
        return TextFeatures(self.text_proj(feats), eot, embeds)

    def score_pairs(
        self, images: ImageMemory, texts: TextFeatures, image_index: torch.Tensor, text_index: torch.Tensor
    ) -> torch.Tensor:
        """(P,) scores of the pairs (image ``image_index[p]``, text ``text_index[p]``)."""
        x = texts.tokens[text_index]  # (P, L, W)
        eot = texts.eot[text_index]  # (P,)
        pos = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, L)
        real = ((pos >= 1) & (pos <= eot[:, None])).to(x.dtype)  # (P, L): the words and <eot>
        align = self._alignment(images, x, image_index, real) if self.cfg.align else 0.0
        for block in self.blocks:
            k, v = block.cross.memory_kv(images.tokens)  # each (B, nh, M, hs): once per image, not per pair
            x, _ = block(x, (k[image_index], v[image_index]))
        if self.cfg.pool == "eot":
            pooled = self.ln_out(x[torch.arange(len(x), device=x.device), eot])  # (P, W)
        else:  # the words and <eot>, not <sot> nor the padding after <eot>
            pooled = (self.ln_out(x) * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (P, W)
        score = self.head(pooled).squeeze(-1) + align  # (P,)
        if self.cfg.clip_prior:
            cos = (images.embeds[image_index] * texts.embeds[text_index]).sum(-1)  # (P,)
            score = score + self.clip_weight * self.clip.logit() * cos
        return score

    def _alignment(self, images: ImageMemory, words: torch.Tensor, image_index: torch.Tensor, real: torch.Tensor):
        """(P,) each word's best cosine over its image's patches, averaged over the words, weighted."""
        w = F.normalize(self.align_text(words), dim=-1)  # (P, L, A)
        p = F.normalize(self.align_image(images.tokens[:, 1:]), dim=-1)[image_index]  # (P, N, A)
        best = torch.einsum("pla,pna->pln", w, p).amax(dim=-1)  # (P, L)
        return self.align_weight * (best * real).sum(1) / real.sum(1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) scores of image i with caption i."""
        idx = torch.arange(len(images), device=self.device)
        return self.score_pairs(self.encode_images(images), self.encode_texts(tokens), idx, idx)
