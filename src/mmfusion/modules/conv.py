"""A small convolutional image encoder: fast on a CPU for the low-resolution images of fusion tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import field


@dataclass
class ConvImageConfig:
    """A stack of stride-2 convolution blocks; the last feature map's cells are the tokens."""

    channels: tuple[int, ...] = field((16, 32, 64), "output channels of each stride-2 block")
    width: int = field(96, "token width (a 1x1 projection of the last block)")
    grayscale: bool = field(False, "average the colour channels first (for greyscale inputs)")


class ConvImageEncoder(nn.Module):
    """Images (B, 3, H, W), uint8 or float in [0, 1], to tokens (B, H/2^k * W/2^k, width).

    Each block is conv 3x3 stride 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU: normalisation
    after every convolution is what lets a fusion model learn from both modalities at once (without it,
    early and attention fusion stayed at chance on a correspondence task).
    """

    def __init__(self, cfg: ConvImageConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1 if cfg.grayscale else 3
        for c in cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.GELU(),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, cfg.width, 1)
        self.width = cfg.width

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.cfg.grayscale:
            x = x.mean(dim=1, keepdim=True)
        x = (x - 0.5) / 0.25
        x = self.proj(self.body(x))  # (B, width, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images).mean(dim=1)
