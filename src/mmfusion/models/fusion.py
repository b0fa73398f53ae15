"""A fusion classifier: one encoder per modality, a fusion strategy, a classification head.

Modalities are named. ``image`` gets a small convolutional encoder (uint8 images in), ``audio`` a
convolutional encoder over log-mel spectrograms, and any other name a feature encoder (LayerNorm + MLP)
over precomputed features ((B, D) vectors or (B, T, D) tokens) of the width given in ``feature_dims``.
Encoders give tokens; the fusion (see :mod:`mmfusion.modules.fusions`) combines them, pooling where it
works on vectors. A modality may be missing for some examples (``present`` masks), and modality dropout
in training teaches the model to cope with that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import field
from ..modules.conv import ConvImageConfig, ConvImageEncoder
from ..modules.encoders import AudioEncoder, AudioEncoderConfig
from ..modules.fusions import FUSIONS, ModalityDropout, build_fusion


@dataclass
class FeatureEncoderConfig:
    hidden: int = field(256, "hidden width of the MLP over precomputed features")
    width: int = field(128, "output width")


@dataclass
class FusionConfig:
    """A fusion classifier. ``modalities``, ``num_classes`` and ``feature_dims`` usually come from the data."""

    modalities: tuple[str, ...] = field(("image", "audio"), "modality names, in order (the first is the primary)")
    feature_dims: dict[str, int] = field(factory=dict, help="input width of each precomputed-feature modality")
    num_classes: int = field(48, "number of classes")
    class_names: list[str] = field(factory=list, help="the class names, for reports")
    strategy: str = field("concat", "fusion strategy: " + ", ".join(FUSIONS))
    width: int = field(128, "width of the fused representation")
    fusion: dict[str, Any] = field(factory=dict, help="options of the strategy (heads, layers, rank, combine)")
    image: ConvImageConfig = field(factory=ConvImageConfig, help="the image encoder")
    audio: AudioEncoderConfig = field(factory=AudioEncoderConfig, help="the audio encoder")
    features: FeatureEncoderConfig = field(factory=FeatureEncoderConfig, help="encoders of precomputed features")
    dropout: float = field(0.1, "dropout before the head")
    modality_dropout: float = field(0.0, "in training, drop each modality of an example with this probability")


class FeatureEncoder(nn.Module):
    """Standardise -> Linear -> GELU -> Linear -> LayerNorm over the last axis of (B, D) or (B, T, D).

    Standardisation uses the training data's per-feature mean and std (buffers, saved with the model; set
    by :meth:`fit`), not a per-example LayerNorm: on a few raw features a LayerNorm would mix them and
    lose their absolute values, which a label may depend on.
    """

    def __init__(self, dim: int, cfg: FeatureEncoderConfig):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(
            nn.Linear(dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.width), nn.LayerNorm(cfg.width)
        )
        self.width = cfg.width

    @torch.no_grad()
    def fit(self, x: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Set the standardisation from training features (rows of examples that have the modality)."""
        x = x.float()
        if present is not None:
            x = x[present]
        flat = x.reshape(-1, x.shape[-1])
        if len(flat):
            self.mean.copy_(flat.mean(0))
            self.std.copy_(flat.std(0, unbiased=False).clamp_min(1e-6))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return self.net(x if x.dim() == 3 else x[:, None, :])


class FusionClassifier(nn.Module):
    family = "fusion"

    def __init__(self, cfg: FusionConfig, tokenizer=None, name: str = "fusion"):
        super().__init__()
        if not cfg.modalities:
            raise ValueError("a fusion classifier needs at least one modality")
        self.cfg, self.name, self.tokenizer = cfg, name, None
        encoders = {}
        for m in cfg.modalities:
            if m == "image":
                encoders[m] = ConvImageEncoder(cfg.image)
            elif m == "audio":
                encoders[m] = AudioEncoder(cfg.audio)
            elif m in cfg.feature_dims:
                encoders[m] = FeatureEncoder(int(cfg.feature_dims[m]), cfg.features)
            else:
                raise ValueError(
                    f"modality {m!r}: give its feature width in feature_dims (image and audio have their own encoders)"
                )
        self.encoders = nn.ModuleDict(encoders)
        dims = {m: int(e.width) for m, e in self.encoders.items()}
        kw = dict(cfg.fusion)
        if FUSIONS[cfg.strategy].produces_logits if cfg.strategy in FUSIONS else False:
            kw.setdefault("num_classes", cfg.num_classes)
        self.fusion = build_fusion(cfg.strategy, dims, cfg.width, **kw)
        self.produces_logits = bool(getattr(self.fusion, "produces_logits", False))
        # an MLP head: a fused *representation* (not a sum of per-modality scores, as late fusion has) can then
        # express interactions between modalities, such as "the sound's colour is the image's colour"
        d = self.fusion.out_dim
        self.head = (
            nn.Identity()
            if self.produces_logits
            else nn.Sequential(
                nn.LayerNorm(d),
                nn.Linear(d, cfg.width),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.width, cfg.num_classes),
            )  # fmt: skip
        )
        self.modality_dropout = ModalityDropout(cfg.modality_dropout) if cfg.modality_dropout > 0 else None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.cfg.modalities)

    def encode(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tokens (B, T, width) of each modality given."""
        unknown = sorted(set(features) - set(self.encoders))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this model reads {list(self.encoders)}")
        return {m: self.encoders[m].forward_tokens(x) for m, x in features.items()}

    def forward(
        self,
        features: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor] | None = None,
        padding: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Class logits (B, num_classes). ``present``: bool (B,) per modality, where some examples lack it."""
        tokens = self.encode(features)
        if self.modality_dropout is not None and self.training:
            present = self.modality_dropout(tokens, present)
        return self.head(self.fusion(tokens, present=present, padding=padding))

    @torch.no_grad()
    def predict(self, features, present=None, batch_size: int = 1024) -> torch.Tensor:
        """Class probabilities (N, C), in eval mode, in batches."""
        was = self.training
        self.eval()
        n = len(next(iter(features.values())))
        out = []
        for i in range(0, n, batch_size):
            f = {m: x[i : i + batch_size] for m, x in features.items()}
            p = {m: x[i : i + batch_size] for m, x in (present or {}).items()}
            out.append(self(f, present=p or None).float().softmax(-1))
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.cfg.num_classes)
