"""Transformer building blocks (pre-norm, as in CLIP and ViT).

Attention uses one fused QKV projection and ``scaled_dot_product_attention``, which picks a fused
kernel on CPU and GPU; causal masking is passed as ``is_causal`` rather than a materialised mask.
"""

from __future__ import annotations

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


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, W = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, W // self.heads)  # (B, L, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        y = y.transpose(1, 2).reshape(B, L, W)  # (B, L, W)
        return self.out(y)


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

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional activation checkpointing to save memory."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask)
        return x

    def init_weights(self, width: int) -> None:
        """Scaled init of CLIP: residual-branch outputs shrink with depth so the stack starts near identity."""
        layers = len(self.blocks)
        attn_std = width**-0.5
        proj_std = attn_std * (2 * max(layers, 1)) ** -0.5
        fc_std = (2 * width) ** -0.5
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=attn_std)
            nn.init.normal_(b.attn.out.weight, std=proj_std)
            nn.init.normal_(b.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(b.mlp.fc2.weight, std=proj_std)
            for lin in (b.attn.qkv, b.attn.out, b.mlp.fc1, b.mlp.fc2):
                nn.init.zeros_(lin.bias)
