"""Cross-modal attention blocks: query tokens of one modality attend to context tokens of others.

:class:`CrossModalAttentionBlock` is the pre-norm block of cross-modal transformers (MulT, Tsai et al., 2019);
:class:`GatedCrossAttentionBlock` adds Flamingo's tanh gates that start closed (Alayrac et al., 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MLP


class _CrossAttention(nn.Module):
    """Multi-head attention of query tokens over context tokens (which may have another width)."""

    def __init__(self, width: int, heads: int, context_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, Tq, W = x.shape
        Tk, hs = context.shape[1], W // self.heads
        q = self.q(x).view(B, Tq, self.heads, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        kv = self.kv(context).view(B, Tk, 2, self.heads, hs)  # (B, Tk, 2, nh, hs)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, nh, Tk, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])  # (B, nh, Tq, hs)
        return self.out(y.transpose(1, 2).reshape(B, Tq, W))


class CrossModalAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: x + attn(ln(x), ln(context)), then x + ff(ln(x)).

    Rows whose context is entirely padding (or empty) come out unchanged: both residual branches are
    skipped for them, and their softmax never sees a row of -inf, so there is no NaN.

    Args:
        width: width of the query tokens x.
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden width of the feed-forward as a multiple of ``width``.
        context_dim: width of the context tokens (default: ``width``).
        dropout: dropout on each residual branch.
    """

    def __init__(
        self, width: int, heads: int = 4, mlp_ratio: float = 4.0, context_dim: int | None = None, dropout: float = 0.0
    ):
        super().__init__()
        context_dim = context_dim or width
        self.ln_q = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(context_dim)
        self.attn = _CrossAttention(width, heads, context_dim)
        self.ln_ff = nn.LayerNorm(width)
        self.ff = MLP(width, int(width * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def branch_scales(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Factors on the attention and feed-forward branches (1 here; tanh gates in the gated block)."""
        return 1.0, 1.0

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, Tq, D), context (B, Tk, Dc), context_padding (B, Tk) True at padding -> (B, Tq, D)."""
        B, Tk = context.shape[:2]
        if Tk == 0:
            return x
        pad = torch.zeros(B, Tk, dtype=torch.bool, device=x.device) if context_padding is None else context_padding
        has_context = ~pad.all(dim=1)  # (B,)
        # a row with nothing to attend to attends to everything (finite numbers), and its update is dropped
        allowed = ~pad | ~has_context[:, None]  # (B, Tk)
        context = context.masked_fill(pad.unsqueeze(-1), 0.0)
        keep = has_context[:, None, None]  # (B, 1, 1)
        attn_scale, ff_scale = self.branch_scales()
        y = self.attn(self.ln_q(x), self.ln_context(context), allowed)
        x = x + torch.where(keep, attn_scale * self.drop(y), 0.0)
        return x + torch.where(keep, ff_scale * self.drop(self.ff(self.ln_ff(x))), 0.0)


class GatedCrossAttentionBlock(CrossModalAttentionBlock):
    """Flamingo's gated cross-attention: x + tanh(a_attn) attn(ln(x), ctx), then x + tanh(a_ff) ff(ln(x)).

    Both gates start at 0, so at initialisation the block is exactly the identity on x: inserted into a
    frozen model, it leaves that model's outputs unchanged until training opens the gates.
    """

    def __init__(
        self, width: int, heads: int = 4, mlp_ratio: float = 4.0, context_dim: int | None = None, dropout: float = 0.0
    ):
        super().__init__(width, heads, mlp_ratio, context_dim, dropout)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def branch_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn_gate.tanh(), self.ff_gate.tanh()
