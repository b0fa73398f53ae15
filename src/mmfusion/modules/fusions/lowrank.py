"""Low-rank multimodal fusion (Liu et al., 2018, "Efficient Low-rank Multimodal Fusion with Modality-Specific
Factors"): the multiplicative tensor fusion of all modalities with low-rank factors."""

from __future__ import annotations

import torch
from torch import nn

from .base import Features, Fusion


class LowRankFusion(Fusion):
    """Low-rank multimodal fusion (LMF, Liu et al., 2018): the tensor fusion of all modalities with
    rank-``r`` modality-specific factors, followed by a LayerNorm.

    Tensor fusion takes the outer product of the vectors ``z_m' = [z_m, 1]`` and maps it linearly to
    ``width``; with a weight of rank r that is ``sum_i prod_m (z_m' W_m^(i)) + b`` (elementwise product over
    modalities), where ``W_m^(i)`` is (D_m + 1, width), at a cost linear in the number of modalities.

    A missing modality keeps only its "1" row (its vector is zeroed). That is the principled choice, not a
    placeholder: the appended 1 is what puts every lower-order term (unimodal, bimodal, ...) into the outer
    product, and zeroing ``z_m`` removes exactly the terms that involve modality m, leaving the fusion of
    the others times a learned constant per rank. So missing modalities are masked: what their features
    were never changes the output. The "1" rows start at 1 (the others small and random), so at first the
    fusion is ``prod_m (1 + z_m W_m)``: unimodal terms plus their interactions.

    Args:
        dims: feature width of each modality.
        width: output width.
        rank: rank r of the factors.
    """

    def __init__(self, dims: dict[str, int], width: int, rank: int = 4):
        super().__init__(dims, width)
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.rank = rank
        factors = {}
        for m, d in self.dims.items():
            w = torch.randn(rank, d + 1, width) * d**-0.5
            w[:, d] = 1.0
            factors[m] = nn.Parameter(w)
        self.factors = nn.ParameterDict(factors)
        self.bias = nn.Parameter(torch.zeros(width))
        self.norm = nn.LayerNorm(width)

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        xs, _ = self.pooled_inputs(features, present, padding)  # absent rows are zero
        fused = None
        for m, x in zip(self.modalities, xs):
            w = self.factors[m]  # (r, D + 1, W)
            h = torch.einsum("bd,rdw->brw", x, w[:, :-1]) + w[:, -1]  # [z, 1] @ W^(i) for every rank: (B, r, W)
            fused = h if fused is None else fused * h
        return self.norm(fused.sum(dim=1) + self.bias)  # (B, W)
