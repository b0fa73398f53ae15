"""CLIP: a dual encoder trained so that matching images and texts have the highest cosine similarity
(Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021).

A ViT image tower and a causal text transformer (pooled at ``<eot>``) each project into a shared
``embed_dim`` space; a learnable logit scale (initialised at ln(1/0.07), clamped at ln(100)) turns
cosine similarities into logits. The same model trains with InfoNCE, SigLIP's sigmoid loss (which adds
a learnable bias) or a triplet loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import field
from ..data.images import CLIP_MEAN, CLIP_STD, ImageTransform
from ..data.tokenizer import Tokenizer
from ..modules.encoders import TextConfig, TextTransformer, VisionConfig, VisionTransformer
from ..modules.losses import LogitScale


@dataclass
class CLIPConfig:
    """A CLIP dual encoder."""

    embed_dim: int = field(128, "width of the shared image-text embedding space")
    vision: VisionConfig = field(factory=VisionConfig, help="image tower")
    text: TextConfig = field(factory=TextConfig, help="text tower")
    init_logit_scale: float = field(math.log(1 / 0.07), "initial log logit scale: ln(1/0.07) (CLIP), ln(10) (SigLIP)")
    max_logit_scale: float = field(math.log(100), "clamp of the log logit scale")
    learn_logit_scale: bool = field(True, "learn the temperature (False keeps it fixed at its initial value)")
    init_logit_bias: float | None = field(None, "learnable logit bias for SigLIP (-10 in the paper); null for none")
    image_mean: tuple[float, ...] = field(CLIP_MEAN, "per-channel mean for image normalisation")
    image_std: tuple[float, ...] = field(CLIP_STD, "per-channel std for image normalisation")


@dataclass
class CLIPOutput:
    image_embeds: torch.Tensor  # (B, D), normalised
    text_embeds: torch.Tensor  # (B, D), normalised
    logit_scale: torch.Tensor  # scalar, exponentiated and clamped
    logit_bias: torch.Tensor | None  # scalar for SigLIP, else None


class CLIP(nn.Module):
    """The dual encoder; implements :class:`mmfusion.interfaces.Embedder`.

    Args:
        cfg: the architecture.
        tokenizer: turns strings into token ids for :meth:`encode_text`; without one, pass token ids.
        name: a label for reports and the index (a preset name or checkpoint path).
    """

    family = "clip"

    def __init__(self, cfg: CLIPConfig, tokenizer: Tokenizer | None = None, name: str = "clip"):
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.tokenizer = tokenizer
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit = LogitScale(cfg.init_logit_scale, cfg.max_logit_scale, cfg.learn_logit_scale, cfg.init_logit_bias)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def device(self) -> torch.device:
        return self.visual.pos_embed.device

    @property
    def transform(self) -> ImageTransform:
        """The preprocessing this model expects for PIL images."""
        return ImageTransform(self.cfg.vision.image_size, self.cfg.image_mean, self.cfg.image_std)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError(
                f"model {self.name!r} has no tokenizer, so it cannot read strings: pass token ids, "
                "or load a trained checkpoint (it keeps tokenizer.json)"
            )
        return self.tokenizer.encode(texts)

    def encode_image(
        self, images: Image.Image | Sequence[Image.Image] | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Embed images: PIL images, or a float tensor (B, 3, H, W) already preprocessed."""
        x = images if isinstance(images, torch.Tensor) else self.transform(images)
        z = self.visual(x.to(self.device))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed texts: strings, or token ids (B, L) from this model's tokenizer."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        z = self.text(tokens.to(self.device))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(self.encode_image(images), self.encode_text(tokens), self.logit(), self.logit.bias)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N_img, N_txt) logits from normalised embeddings, as the model was trained to score them."""
        out = self.logit() * image_embeds @ text_embeds.t()
        return out + self.logit.bias if self.logit.bias is not None else out

    @torch.no_grad()
    def probabilities(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Per image, how well each text fits: a softmax over the texts for a model trained with InfoNCE; an
        independent sigmoid per pair for one trained with the sigmoid loss (it has a logit bias)."""
        lg = self.logits(image_embeds.to(self.device), text_embeds.to(self.device)).float().cpu()
        return torch.sigmoid(lg) if self.logit.bias is not None else lg.softmax(dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable
