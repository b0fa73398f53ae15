"""A video classifier: a video encoder (TimeSformer, joint space-time attention, or frame pooling; see
:mod:`mmfusion.modules.video`) and a linear head over its clip features.

Clips go in as uint8 frames (B, T, H, W, 3), as :mod:`mmfusion.data.video` renders and decodes them, or as
video files; the model samples, resizes and normalises them as it was trained to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import field
from ..data.images import CLIP_MEAN, CLIP_STD
from ..data.video import ACTIONS, normalize_video, read_video
from ..modules.video import VideoEncoderConfig, build_video_encoder


@dataclass
class VideoConfig:
    """A video classifier. ``class_names`` (and with them ``num_classes``) usually come from the data."""

    encoder: VideoEncoderConfig = field(factory=VideoEncoderConfig, help="the video encoder (attention: ...)")
    class_names: list[str] = field(factory=lambda: list(ACTIONS), help="the classes, in the order of the logits")
    dropout: float = field(0.0, "dropout before the classifier")
    image_mean: tuple[float, ...] = field(CLIP_MEAN, "per-channel mean for frame normalisation")
    image_std: tuple[float, ...] = field(CLIP_STD, "per-channel std for frame normalisation")


class VideoClassifier(nn.Module):
    """Clips -> class logits; ``encode_video`` gives the clip features."""

    family = "video"

    def __init__(self, cfg: VideoConfig, tokenizer=None, name: str = "video"):
        super().__init__()
        if not cfg.class_names:
            raise ValueError("a video classifier needs its classes: set cfg.class_names")
        self.cfg, self.name, self.tokenizer = cfg, name, None
        self.encoder = build_video_encoder(cfg.encoder)
        # a linear head, as TimeSformer and ViT have (an MLP head learned more slowly here, and did not help
        # frame pooling either)
        self.head = nn.Sequential(nn.LayerNorm(self.encoder.width), nn.Dropout(cfg.dropout),
                                  nn.Linear(self.encoder.width, len(cfg.class_names)))  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_classes(self) -> int:
        return len(self.cfg.class_names)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Class logits (B, classes) of normalised clips (B, T, 3, H, W)."""
        return self.head(self.encoder(clips))

    def preprocess(self, clips: torch.Tensor | np.ndarray | Sequence[str | os.PathLike]) -> torch.Tensor:
        """uint8 frames (B, T, H, W, 3), or video files (sampled and resized), -> normalised (B, T, 3, H, W)."""
        e = self.cfg.encoder
        if not isinstance(clips, (torch.Tensor, np.ndarray)):
            clips = np.stack([read_video(p, e.frames, e.image_size) for p in clips])
        x = torch.as_tensor(clips)
        if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        return normalize_video(x, self.cfg.image_mean, self.cfg.image_std)

    @torch.no_grad()
    def encode_video(self, clips, normalize: bool = True) -> torch.Tensor:
        """(B, width) clip features of uint8 frames or files; L2-normalised unless ``normalize=False``."""
        was = self.training
        self.eval()
        try:
            feats = self.encoder(self.preprocess(clips).to(self.device)).float()
        finally:
            self.train(was)
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def predict(self, clips, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (B, classes) of uint8 frames or files, in eval mode, in batches."""
        was = self.training
        self.eval()
        try:
            out = [self(self.preprocess(clips[i : i + batch_size]).to(self.device)).float().softmax(-1).cpu()
                   for i in range(0, len(clips), batch_size)]  # fmt: skip
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def classify(self, clips, batch_size: int = 64) -> list[str]:
        """The most likely class of each clip."""
        return [self.cfg.class_names[i] for i in self.predict(clips, batch_size).argmax(-1).tolist()]
