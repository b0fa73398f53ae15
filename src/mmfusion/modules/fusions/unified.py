"""A shared representation space: every modality projected into one space and averaged."""

from __future__ import annotations

import torch
from torch import nn

from .base import Features, Fusion, masked_mean, projection


class UnifiedFusion(Fusion):
    """A shared representation space: one Linear + LayerNorm per modality into ``width``, then the mean over
    the modalities each example has. Missing modalities are masked (they never change the output), and any
    number of modalities works.
    """

    def __init__(self, dims: dict[str, int], width: int):
        super().__init__(dims, width)
        self.proj = nn.ModuleDict({m: projection(d, width) for m, d in self.dims.items()})

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        xs, mask = self.pooled_inputs(features, present, padding)
        h = torch.stack([self.proj[m](x) for m, x in zip(self.modalities, xs)], dim=1)  # (B, M, W)
        return masked_mean(h, ~mask)  # (B, W)
