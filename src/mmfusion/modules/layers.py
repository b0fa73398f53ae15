"""Transformer building blocks (pre-norm, as in CLIP and ViT).

Attention uses one fused QKV projection and ``scaled_dot_product_attention``, which picks a fused
kernel on CPU and GPU; causal masking is passed as ``is_causal`` rather than a materialised mask. Many
short unmasked sequences on CPU (TimeSformer's time attention: one sequence of 8 frames per patch) go
through two batched matmuls instead: the CPU flash kernel spends 2-4x longer on them (see :func:`attend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the original CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; choose gelu, gelu_tanh or quick_gelu")


SHORT_SEQUENCE = 32  # on CPU, unmasked attention over at most this many keys runs as plain matmuls


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(d)) v over (..., L, d) tensors, as ``scaled_dot_product_attention``.

    On CPU, unmasked sequences of at most ``SHORT_SEQUENCE`` keys use matmul + softmax: for thousands of
    8-key sequences the flash kernel took 3.4x as long in inference (4.2 vs 1.2 ms for 512 x 4 heads of 8
    tokens) and the same in training. Longer sequences keep the fused kernel, which never materialises the
    scores.
    """
    if q.device.type == "cpu" and mask is None and not causal and k.shape[-2] <= SHORT_SEQUENCE:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    ``head_dim`` defaults to ``width // heads``; a pruned block keeps its heads' size with fewer of them, so its
    heads x head_dim (the inner width) is less than ``width``.
    """

    def __init__(self, width: int, heads: int, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if width % heads:
                raise ValueError(f"width {width} must be divisible by heads {heads}")
            head_dim = width // heads
        if heads < 1:
            raise ValueError(f"an attention layer needs at least one head, got {heads}")
        self.heads, self.head_dim = heads, head_dim
        self.inner = heads * head_dim
        self.qkv = nn.Linear(width, 3 * self.inner)
        self.out = nn.Linear(self.inner, width)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)  # (B, L, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, L, hs)
        y = attend(q, k, v, mask, causal).transpose(1, 2).reshape(B, L, self.inner)  # (B, L, nh*hs)
        return self.out(y)

    def forward_query(self, x: torch.Tensor, query: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention outputs at a few query tokens only: ``query`` (B, Q, W) attends to all of ``x`` (B, L, W)
        (``mask`` (B, 1, Q, L) True where allowed). Keys and values cost as before; queries, the output
        projection and everything after it shrink from L to Q rows."""
        B, L, _ = x.shape
        Q, hs, inner = query.shape[1], self.head_dim, self.inner
        if isinstance(self.qkv.weight, torch.Tensor):
            w_q, w_kv = self.qkv.weight.split([inner, 2 * inner])
            b_q, b_kv = self.qkv.bias.split([inner, 2 * inner])
            q, kv = F.linear(query, w_q, b_q), F.linear(x, w_kv, b_kv)
        else:  # int8 (models/int8.py) packs the weight: project all three, keep the parts needed
            q, kv = self.qkv(query)[..., :inner], self.qkv(x)[..., inner:]
        q = q.view(B, Q, self.heads, hs).transpose(1, 2)  # (B, nh, Q, hs)
        k, v = kv.view(B, L, 2, self.heads, hs).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Q, hs)
        return self.out(y.transpose(1, 2).reshape(B, Q, inner))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        head_dim: int | None = None,
        hidden: int | None = None,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, head_dim)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden or int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln2(x))

    def forward_query(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output at one token per sequence, ``index`` (B,), computed without the other rows:
        (B, 1, W), equal to ``forward(x)[arange(B), index]`` when ``mask`` says what that token could see."""
        h = self.ln1(x)
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, index].unsqueeze(1) + self.attn.forward_query(h, h[rows, index].unsqueeze(1), mask)
        return y + self.mlp(self.ln2(y))


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional activation checkpointing to save memory."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        layer_heads: Sequence[int] | None = None,
        layer_hidden: Sequence[int] | None = None,
    ):
        """``layer_heads`` / ``layer_hidden``: per block, the heads (of ``width // heads`` channels each) and the MLP
        hidden width a pruned model kept; None for ``heads`` and ``width * mlp_ratio`` in every block."""
        super().__init__()
        for name, per_layer in (("layer_heads", layer_heads), ("layer_hidden", layer_hidden)):
            if per_layer is not None and len(per_layer) != layers:
                raise ValueError(f"{name} has {len(per_layer)} entries for {layers} layers")
        head_dim = width // heads if layer_heads is not None else None
        self.blocks = nn.ModuleList(
            Block(
                width,
                layer_heads[i] if layer_heads is not None else heads,
                mlp_ratio,
                act,
                head_dim,
                layer_hidden[i] if layer_hidden is not None else None,
            )
            for i in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask)
        return x

    def forward_pooled(self, x: torch.Tensor, index: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Features (B, W) of one token per sequence after the whole stack: every block but the last
        runs in full, the last only at ``index`` (B,), which is all that pooled embeddings need.
        Exact: the same numbers as ``forward(x, causal)[arange(B), index]`` for less work."""
        if not self.blocks:
            return x[torch.arange(x.shape[0], device=x.device), index]
        for block in self.blocks[:-1]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, None, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        mask = None
        if causal:  # the pooled token sees the positions up to its own
            positions = torch.arange(x.shape[1], device=x.device)
            mask = (positions[None, :] <= index[:, None])[:, None, None, :]  # (B, 1, 1, L)
        return self.blocks[-1].forward_query(x, index, mask).squeeze(1)

    def init_weights(self, width: int) -> None:
        init_blocks(self.blocks, width)


def init_blocks(blocks: nn.ModuleList, width: int) -> None:
    """Scaled init of CLIP: residual-branch outputs shrink with depth so the stack starts near identity. Each
    block's attentions (one in a :class:`Block`, time then space in a divided space-time block) and its MLP."""
    attn_std = width**-0.5
    proj_std = attn_std * (2 * max(len(blocks), 1)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for b in blocks:
        attns = [m for m in b.modules() if isinstance(m, Attention)]
        for a in attns:
            nn.init.normal_(a.qkv.weight, std=attn_std)
            nn.init.normal_(a.out.weight, std=proj_std)
        nn.init.normal_(b.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(b.mlp.fc2.weight, std=proj_std)
        for lin in [*(a.qkv for a in attns), *(a.out for a in attns), b.mlp.fc1, b.mlp.fc2]:
            nn.init.zeros_(lin.bias)
