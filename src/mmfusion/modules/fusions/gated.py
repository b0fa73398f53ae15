"""Gated cross-attention fusion (Flamingo, Alayrac et al., 2022): a primary modality attends to the others
through tanh-gated blocks that start as the identity."""

from __future__ import annotations

import torch
from torch import nn

from .base import Features, Fusion, masked_mean, projection
from .blocks import GatedCrossAttentionBlock


class GatedCrossAttentionFusion(Fusion):
    """Flamingo-style fusion: the primary modality's tokens attend to the others through gated blocks.

    The primary (the "language" stream, the first modality unless ``primary`` says otherwise) keeps its
    own width; the other modalities' tokens are projected to ``width`` (Linear + LayerNorm, plus a learned
    modality embedding) and concatenated as the context. The gates start closed, so at initialisation the
    output is the mean of the primary's tokens (through a Linear to ``width`` when the widths differ).

    Missing context modalities are masked (they never change the output). A missing primary is replaced
    by a learned placeholder token, which then works as a learned query over the present modalities.

    Args:
        dims: feature width of each modality.
        width: context and output width.
        primary: the modality that attends (default: the first in ``dims``).
        layers: gated blocks.
        heads: attention heads (must divide the primary's width).
        mlp_ratio: feed-forward hidden width as a multiple of the primary's width.
        dropout: dropout on the residual branches.
    """

    def __init__(
        self,
        dims: dict[str, int],
        width: int,
        primary: str | None = None,
        layers: int = 1,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__(dims, width)
        self.primary = primary or self.modalities[0]
        if self.primary not in self.dims:
            raise ValueError(f"primary modality {self.primary!r} is not one of {list(self.modalities)}")
        self.context_modalities = tuple(m for m in self.modalities if m != self.primary)
        dim = self.dims[self.primary]
        self.proj = nn.ModuleDict({m: projection(self.dims[m], width) for m in self.context_modalities})
        self.modality_embed = nn.Parameter(0.02 * torch.randn(len(self.context_modalities), width))
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, heads, mlp_ratio, context_dim=width, dropout=dropout) for _ in range(layers)
        )
        self.placeholder = nn.Parameter(0.02 * torch.randn(dim))
        self.head = nn.Linear(dim, width) if dim != width else nn.Identity()

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        tokens, pads, mask = self.token_inputs(features, present, padding)
        index = {m: i for i, m in enumerate(self.modalities)}
        x, pad = tokens[index[self.primary]], pads[index[self.primary]]  # (B, T, D), (B, T)
        absent = ~mask[:, index[self.primary]]  # (B,)
        # an absent primary becomes one real token (the placeholder) followed by padding
        x = torch.where(absent[:, None, None], self.placeholder, x)
        first_only = torch.arange(x.shape[1], device=x.device) > 0  # (T,)
        pad = torch.where(absent[:, None], first_only, pad)
        if self.context_modalities:
            context = torch.cat(
                [
                    self.proj[m](tokens[index[m]]) + self.modality_embed[j]
                    for j, m in enumerate(self.context_modalities)
                ],
                dim=1,
            )  # (B, sum T_m, width)
            context_pad = torch.cat([pads[index[m]] for m in self.context_modalities], dim=1)
            for block in self.blocks:
                x = block(x, context, context_pad)
        return self.head(masked_mean(x, pad))  # (B, width)
