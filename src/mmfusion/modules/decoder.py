"""A Transformer text decoder that reads image tokens: causal self-attention, cross-attention, a key-value cache.

The decoder of an encoder-decoder captioner (Vaswani et al., 2017; as in "Show, Attend and Tell" with attention
in place of the LSTM). Each pre-norm block runs causal self-attention over the words so far, cross-attention
from the words to the image tokens, and an MLP.

Generation feeds one token per step. Without a cache every step would re-run the whole prefix; with it, each
block keeps the keys and values of the positions already seen (:class:`KVCache`) and the image tokens' keys and
values are projected once per generation, so a step costs one position's worth of work. Both paths give the
same logits (tested), and ``generate(use_cache=False)`` keeps the slow path for checking and benchmarks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import field
from .encoders import sincos_2d
from .layers import MLP, Attention


@dataclass
class DecoderConfig:
    """A causal text decoder with cross-attention to image tokens."""

    vocab_size: int = field(1024, "rows of the token embedding (at least the tokenizer's vocabulary)")
    context_length: int = field(32, "most tokens in a caption, <sot> and <eot> included")
    width: int = field(128, "token width")
    layers: int = field(2, "decoder blocks")
    heads: int = field(4, "attention heads")
    mlp_ratio: float = field(2.0, "hidden width of the MLP as a multiple of width")
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = field("gelu", "MLP activation")
    memory_positions: bool = field(
        False,
        "add each image token's 2-D grid position to it before the cross-attention (as DETR adds them to its "
        "memory): the words can ask where an object lies, not only what it is (which is left of which)",
    )


@functools.lru_cache(maxsize=8)
def _position_table(grid: int, width: int) -> torch.Tensor:
    """(1 + grid * grid, width): zeros for the class token, then the grid's 2-D sine-cosine features (made once per
    shape, not on every decoder pass)."""
    return torch.cat([torch.zeros(1, width), sincos_2d(grid, width)])


class KVCache:
    """Per block: the self-attention keys and values so far (B, heads, T, head size), and the image tokens'
    cross-attention keys and values (computed once). ``reorder`` follows beams as they are re-ranked."""

    def __init__(self, memory_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.memory = memory_kv
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(memory_kv)

    @property
    def length(self) -> int:
        kv = self.self_kv[0]
        return 0 if kv is None else kv[0].shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        self.self_kv = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.self_kv]
        self.memory = [(k[rows], v[rows]) for k, v in self.memory]


class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the image tokens."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, W) image tokens -> keys and values, each (B, heads, M, head size)."""
        B, M, W = memory.shape
        k, v = self.kv(memory).view(B, M, 2, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, W = x.shape
        q = self.q(x).view(B, T, self.heads, W // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, *kv)
        return self.out(y.transpose(1, 2).reshape(B, T, W))


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.cross = CrossAttention(width, heads)
        self.ln3 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def self_attention(
        self, h: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Causal self-attention of the new positions ``h`` (B, T, W) over the cached ones and themselves."""
        B, T, W = h.shape
        a = self.attn
        q, k, v = a.qkv(h).view(B, T, 3, a.heads, W // a.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        P = k.shape[2] - T  # positions already cached
        mask, causal = None, False
        if T > 1 and P == 0:
            causal = True
        elif T > 1:  # new position i sees cached positions and new ones up to itself
            mask = torch.arange(P + T, device=h.device)[None, :] <= (P + torch.arange(T, device=h.device))[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return a.out(y.transpose(1, 2).reshape(B, T, W)), (k, v)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, kv = self.self_attention(self.ln1(x), past)
        x = x + y
        x = x + self.cross(self.ln2(x), memory_kv)
        return x + self.mlp(self.ln3(x)), kv


class TextDecoder(nn.Module):
    """Token ids + image tokens -> next-token logits.

    Args:
        cfg: the decoder's shape.
        memory_width: width of the image tokens (projected to the decoder's width).
    """

    def __init__(self, cfg: DecoderConfig, memory_width: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.memory_proj = nn.Sequential(nn.LayerNorm(memory_width), nn.Linear(memory_width, cfg.width))
        self.memory_pos: nn.Linear | None = None
        if cfg.memory_positions:
            self.add_memory_positions()
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self._scale_residuals()

    def _scale_residuals(self) -> None:
        std = self.cfg.width**-0.5 * (2 * max(self.cfg.layers, 1)) ** -0.5
        for b in self.blocks:
            for lin in (b.attn.out, b.cross.out, b.mlp.fc2):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def add_memory_positions(self) -> None:
        """Give the image tokens their grid positions (``memory_positions``): a linear map of fixed 2-D sine-cosine
        features, zero-initialised, so a trained decoder given them computes exactly what it did until training
        moves the map."""
        self.cfg.memory_positions = True
        if self.memory_pos is None:
            self.memory_pos = nn.Linear(self.cfg.width, self.cfg.width, bias=False).to(
                device=self.pos_embed.device, dtype=self.pos_embed.dtype
            )
            nn.init.zeros_(self.memory_pos.weight)

    def _memory_positions(self, m: torch.Tensor) -> torch.Tensor:
        """(M, width) position features of image tokens laid out as a class token and a square grid, row-major."""
        M = m.shape[1]
        grid = math.isqrt(max(M - 1, 0))
        if M < 2 or grid * grid != M - 1:
            raise ValueError(f"memory_positions needs a class token and a square grid of image tokens, got {M} tokens")
        return _position_table(grid, self.cfg.width).to(device=m.device, dtype=m.dtype)

    def start(self, memory: torch.Tensor) -> KVCache:
        """A cache for generating from image tokens (B, M, memory_width): their keys and values, once."""
        m = self.memory_proj(memory)
        if self.memory_pos is not None:
            m = m + self.memory_pos(self._memory_positions(m))
        return KVCache([b.cross.memory_kv(m) for b in self.blocks])

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, vocab) for ``tokens`` (B, T). Give ``memory`` (B, M, memory_width) for a whole sequence
        (training, or generation without a cache), or a ``cache`` from :meth:`start`, which then grows by T."""
        if cache is None:
            if memory is None:
                raise ValueError("give the image tokens (memory) or a cache from start()")
            cache, keep = self.start(memory), False
        else:
            keep = True
        B, T = tokens.shape
        offset = cache.length
        if offset + T > self.cfg.context_length:
            raise ValueError(f"{offset + T} tokens exceed the decoder's context length {self.cfg.context_length}")
        x = self.token_embed(tokens) + self.pos_embed[offset : offset + T]
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache.memory[i], cache.self_kv[i])
            if keep:
                cache.self_kv[i] = kv
        # the output layer is the token embedding itself (tied, Press & Wolf 2017): one matrix, one tensor saved
        return F.linear(self.ln_final(x), self.token_embed.weight)
