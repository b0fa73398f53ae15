"""Early and late fusion.

- :class:`ConcatFusion` ("concat"): early fusion, an MLP over the concatenated modality vectors.
- :class:`LateFusion` ("late"): one classifier per modality, logits combined by a mean, learned weights or a
  product of experts (Hinton, 2002).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .base import Features, Fusion


class ConcatFusion(Fusion):
    """Early fusion: concatenate the modality vectors, then Linear -> LayerNorm -> GELU -> Linear.

    A missing modality is replaced by a learned placeholder vector of its own (the MLP needs a value in
    every slot), so missing a modality does change the output, but what its features were does not.

    Args:
        dims: feature width of each modality.
        width: output width.
        hidden: hidden width of the MLP (default: ``width``).
        dropout: dropout after the activation.
    """

    def __init__(self, dims: dict[str, int], width: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__(dims, width)
        hidden = hidden or width
        self.placeholders = nn.ParameterDict({m: nn.Parameter(0.02 * torch.randn(d)) for m, d in self.dims.items()})
        self.mlp = nn.Sequential(
            nn.Linear(sum(self.dims.values()), hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
        )

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        xs, mask = self.pooled_inputs(features, present, padding)
        slots = [
            torch.where(mask[:, i, None], x, self.placeholders[m]) for i, (m, x) in enumerate(zip(self.modalities, xs))
        ]
        return self.mlp(torch.cat(slots, dim=-1))  # (B, sum D_m) -> (B, width)


class LateFusion(Fusion):
    """Late fusion: a classifier per modality, logits combined over the modalities each example has.

    Missing modalities are masked: they never change the output. ``combine`` is

    - ``"mean"``: the mean of the present modalities' logits;
    - ``"weighted"``: a weighted sum with learned softmax weights, renormalised over the present modalities;
    - ``"poe"``: a product of experts, the sum of the present modalities' log-softmax (log of the product
      of their class distributions, unnormalised: ``cross_entropy`` and ``softmax`` normalise it).

    Args:
        dims: feature width of each modality.
        width: hidden width of each head.
        num_classes: number of classes (``out_dim``).
        combine: "mean", "weighted" or "poe".
    """

    produces_logits: ClassVar[bool] = True
    COMBINES = ("mean", "weighted", "poe")

    def __init__(self, dims: dict[str, int], width: int, num_classes: int, combine: str = "mean"):
        super().__init__(dims, width)
        if combine not in self.COMBINES:
            raise ValueError(f"unknown combine {combine!r}; choose one of {', '.join(self.COMBINES)}")
        self.combine = combine
        self.out_dim = num_classes
        self.heads = nn.ModuleDict(
            {
                m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width), nn.GELU(), nn.Linear(width, num_classes))
                for m, d in self.dims.items()
            }
        )
        if combine == "weighted":
            self.modality_logits = nn.Parameter(torch.zeros(len(self.dims)))  # uniform weights at first

    def _logits(self, features: Features, present: Features | None, padding: Features | None):
        xs, mask = self.pooled_inputs(features, present, padding)
        logits = torch.stack([self.heads[m](x) for m, x in zip(self.modalities, xs)], dim=1)  # (B, M, C)
        return logits.masked_fill(~mask.unsqueeze(-1), 0.0), mask

    def per_modality_logits(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits (B, C) of each modality given in ``features``; rows where it is absent are zeros."""
        logits, _ = self._logits(features, present, padding)
        return {m: logits[:, i] for i, m in enumerate(self.modalities) if m in features}

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        logits, mask = self._logits(features, present, padding)  # (B, M, C), absent rows zero
        if self.combine == "mean":
            return logits.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(logits.dtype)
        if self.combine == "weighted":
            scores = self.modality_logits.expand(mask.shape).masked_fill(~mask, float("-inf"))  # (B, M)
            return (scores.softmax(dim=-1).unsqueeze(-1) * logits).sum(dim=1)
        log_probs = logits.log_softmax(dim=-1).masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, M, C)
        return log_probs.sum(dim=1)
