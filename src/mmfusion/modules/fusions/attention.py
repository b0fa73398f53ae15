"""Attention over modalities: a softmax over a learned score of each projected modality, per example."""

from __future__ import annotations

import torch
from torch import nn

from .base import Features, Fusion, projection


class AttentionFusion(Fusion):
    """A weighted sum of the projected modalities, with weights from a softmax over a learned score.

    Each modality is projected to ``width`` (Linear + LayerNorm) and scored by a small MLP shared by all
    modalities; the softmax runs over the modalities each example has, so missing ones are masked: they
    get weight 0 and never change the output. ``last_weights`` (B, M) keeps the weights of the last call.

    Args:
        dims: feature width of each modality.
        width: output width.
        hidden: hidden width of the scoring MLP (default: ``width // 2``).
    """

    def __init__(self, dims: dict[str, int], width: int, hidden: int | None = None):
        super().__init__(dims, width)
        hidden = hidden or max(1, width // 2)
        self.proj = nn.ModuleDict({m: projection(d, width) for m, d in self.dims.items()})
        # no bias on the score: a constant shift of every score leaves the softmax unchanged
        self.score = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))
        self.last_weights: torch.Tensor | None = None

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        xs, mask = self.pooled_inputs(features, present, padding)
        h = torch.stack([self.proj[m](x) for m, x in zip(self.modalities, xs)], dim=1)  # (B, M, W)
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, M)
        weights = scores.softmax(dim=-1)
        self.last_weights = weights.detach()
        return (weights.unsqueeze(-1) * h).sum(dim=1)  # (B, W)
