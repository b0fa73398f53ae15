"""Cross-modal attention fusion: each modality's tokens attend to the other modalities' tokens (MulT,
Tsai et al., 2019), then pooled and averaged over the present modalities."""

from __future__ import annotations

import torch
from torch import nn

from .base import Features, Fusion, masked_mean, projection
from .blocks import CrossModalAttentionBlock


class CrossAttentionFusion(Fusion):
    """Cross-modal attention: every modality's tokens attend to the tokens of the other present modalities.

    Tokens are projected to ``width`` (Linear + LayerNorm) plus a learned embedding of their modality. Each
    layer updates every modality at once from the previous layer's tokens, through a
    :class:`CrossModalAttentionBlock` of its own. Each modality is then mean-pooled over its real tokens,
    and the modalities are averaged over the present ones (then a LayerNorm). Averaging, not concatenation
    + Linear, keeps missing modalities masked: they neither serve as context nor enter the average, so they
    never change the output, and any subset of modalities works without placeholders.

    Args:
        dims: feature width of each modality.
        width: token and output width.
        layers: cross-attention layers.
        heads: attention heads (must divide ``width``).
        mlp_ratio: feed-forward hidden width as a multiple of ``width``.
        dropout: dropout on the residual branches.
    """

    def __init__(
        self,
        dims: dict[str, int],
        width: int,
        layers: int = 1,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__(dims, width)
        self.proj = nn.ModuleDict({m: projection(d, width) for m, d in self.dims.items()})
        self.modality_embed = nn.Parameter(0.02 * torch.randn(len(self.dims), width))
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: CrossModalAttentionBlock(width, heads, mlp_ratio, dropout=dropout) for m in self.dims})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        tokens, pads, mask = self.token_inputs(features, present, padding)
        xs = [self.proj[m](x) + self.modality_embed[i] for i, (m, x) in enumerate(zip(self.modalities, tokens))]
        for blocks in self.layers:
            updated = []
            for i, m in enumerate(self.modalities):
                others = [j for j in range(len(xs)) if j != i]
                if not others:
                    updated.append(xs[i])
                    continue
                context = torch.cat([xs[j] for j in others], dim=1)  # (B, sum T_j, W)
                context_pad = torch.cat([pads[j] for j in others], dim=1)  # (B, sum T_j)
                updated.append(blocks[m](xs[i], context, context_pad))
            xs = updated
        pooled = torch.stack([masked_mean(x, pad) for x, pad in zip(xs, pads)], dim=1)  # (B, M, W)
        return self.norm(masked_mean(pooled, ~mask))  # (B, W)
