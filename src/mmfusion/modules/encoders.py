"""Encoders: a Vision Transformer (Dosovitskiy et al., 2021) and CLIP's causal text transformer
(Radford et al., 2021), each ``forward_features`` (tokens) + ``forward_head`` (pooled, projected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import field
from .layers import Transformer


@dataclass
class VisionConfig:
    """A ViT image tower."""

    image_size: int = field(64, "side of the square input image")
    patch_size: int = field(8, "side of the square patches; image_size must be a multiple")
    width: int = field(128, "token width")
    layers: int = field(4, "transformer blocks")
    heads: int = field(4, "attention heads")
    mlp_ratio: float = field(2.0, "hidden width of the MLP as a multiple of width")
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = field("gelu", "MLP activation")
    pool: Literal["cls", "mean", "cls+mean"] = field(
        "cls", "pool the class token, the mean of patch tokens (a bag of local features), or both side by side"
    )
    pos_init: Literal["random", "sincos"] = field(
        "random",
        "initial position embeddings: small random values, or 2-D sine-cosine (spatial structure from the first step)",
    )
    stem: Literal["patch", "conv"] = field(
        "patch",
        "patchify with one strided conv, or a stack of stride-2 3x3 "
        "convs (Xiao et al., 2021); patch_size must be a power of 2",
    )
    layer_heads: list[int] | None = field(None, "heads each block kept after pruning (null: heads in every block)")
    layer_mlp: list[int] | None = field(None, "MLP hidden width of each block after pruning (null: width x mlp_ratio)")


@dataclass
class TextConfig:
    """A causal text transformer pooled at the end-of-text token."""

    vocab_size: int = field(1024, "rows of the token embedding (at least the tokenizer's vocabulary)")
    context_length: int = field(32, "tokens per text, <sot> and <eot> included")
    width: int = field(128, "token width")
    layers: int = field(2, "transformer blocks")
    heads: int = field(4, "attention heads")
    mlp_ratio: float = field(2.0, "hidden width of the MLP as a multiple of width")
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = field("gelu", "MLP activation")
    eot_id: int = field(3, "id of the end-of-text token, whose features are pooled")
    layer_heads: list[int] | None = field(None, "heads each block kept after pruning (null: heads in every block)")
    layer_mlp: list[int] | None = field(None, "MLP hidden width of each block after pruning (null: width x mlp_ratio)")


def sincos_2d(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """(grid*grid, width) 2-D sine-cosine position embeddings: a quarter of the channels each for
    sin(y), cos(y), sin(x), cos(x) at geometrically spaced frequencies (as in MAE)."""
    if width % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {width}")
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    y = y.flatten()[:, None] * omega[None, :]  # (N, W/4)
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)  # (N, W), row-major patch order


def conv_stem(patch_size: int, width: int) -> nn.Sequential:
    """log2(patch) stride-2 3x3 convs (channels doubling up to width/2), then a 1x1 conv to the width."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch_size, got {patch_size}")
    layers: list[nn.Module] = []
    c_in = 3
    for k in range(n):
        c_out = max(16, width // 2 ** (n - k))
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        scale = cfg.width**-0.5
        self.patch_embed = (
            conv_stem(cfg.patch_size, cfg.width)
            if cfg.stem == "conv"
            else nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        )
        self.cls_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(n_patches + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.layer_heads, cfg.layer_mlp
        )
        pooled = 2 * cfg.width if cfg.pool == "cls+mean" else cfg.width
        self.ln_post = nn.LayerNorm(pooled)
        self.proj = nn.Parameter(pooled**-0.5 * torch.randn(pooled, embed_dim))
        self.transformer.init_weights(cfg.width)
        if cfg.pos_init == "sincos":
            with torch.no_grad():
                self.pos_embed.zero_()
                self.pos_embed[1:] = sincos_2d(cfg.image_size // cfg.patch_size, cfg.width)

    @torch.no_grad()
    def init_patch_whitening(self, images: torch.Tensor, eps: float = 1e-2) -> int:
        """Make the patch embedding a whitening of the patches of ``images`` (B, 3, H, W), preprocessed as the
        model sees them: filter i becomes the i-th principal component of the patches, scaled by
        1 / sqrt(its variance + eps x the mean variance). The first layer then starts with decorrelated,
        unit-variance features of what the data varies in, instead of random projections (first-layer
        whitening is a known speed-up of training from scratch). Filters beyond the patch's pixel count keep
        their initialisation; returns how many were set.
        """
        conv = self.patch_embed
        if not isinstance(conv, nn.Conv2d):
            raise ValueError("patch whitening initialises the patch stem; vision.stem=conv has no such layer")
        k, dim = conv.kernel_size[0], conv.weight[0].numel()
        total, sums, products = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
        for chunk in images.split(64):  # a few hundred 224 px images would take gigabytes at once
            patches = F.unfold(chunk.double(), k, stride=conv.stride[0], padding=conv.padding[0])  # (b, dim, L)
            patches = patches.transpose(1, 2).reshape(-1, dim).cpu()
            total, sums, products = total + len(patches), sums + patches.sum(0), products + patches.T @ patches
        if total < dim:
            raise ValueError(f"whitening {dim}-pixel patches needs at least {dim} patches, got {total}")
        mean = sums / total
        variance, components = torch.linalg.eigh(products / total - torch.outer(mean, mean))  # ascending
        variance, components = variance.flip(0), components.flip(1)
        n = min(conv.out_channels, dim)
        filters = components[:, :n] / (variance[:n] + eps * variance.mean()).sqrt()  # (dim, n)
        conv.weight[:n] = filters.T.reshape(n, *conv.weight.shape[1:]).to(conv.weight)
        return n

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> input tokens (B, 1 + N, W): class token, then patches, plus positions."""
        x = self.patch_embed(images)  # (B, W, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.cls_token.expand(x.shape[0], 1, -1)  # (B, 1, W)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, W)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> tokens (B, 1 + N, W), class token first."""
        return self.transformer(self.ln_pre(self.embed(images)))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + N, W) -> embedding (B, D)."""
        if self.cfg.pool == "cls":
            pooled = tokens[:, 0]  # (B, W)
        elif self.cfg.pool == "mean":
            pooled = tokens[:, 1:].mean(dim=1)  # (B, W)
        else:
            pooled = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)  # (B, 2W)
        return self.ln_post(pooled) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> embeddings (B, D). With class-token pooling the last block runs for
        the class token alone (``Transformer.forward_pooled``): the same embedding, less work."""
        if self.cfg.pool != "cls":
            return self.forward_head(self.forward_features(images))
        x = self.ln_pre(self.embed(images))
        index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.ln_post(self.transformer.forward_pooled(x, index)) @ self.proj


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.layer_heads, cfg.layer_mlp
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj, std=cfg.width**-0.5)
        self.transformer.init_weights(cfg.width)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> features (B, L, W); position t sees only positions <= t."""
        L = tokens.shape[1]
        if self.cfg.context_length < L:
            raise ValueError(f"{L} tokens exceed the context length {self.cfg.context_length}")
        x = self.token_embed(tokens) + self.pos_embed[:L]  # (B, L, W)
        return self.ln_final(self.transformer(x, causal=True))

    def forward_head(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Features (B, L, W) pooled at each text's <eot> -> embedding (B, D)."""
        eot = self.eot_index(tokens)  # (B,)
        pooled = features[torch.arange(features.shape[0], device=features.device), eot]  # (B, W)
        return pooled @ self.proj

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> embeddings (B, D), computing only what the <eot> features depend on:
        columns after the batch's last <eot> are dropped (causal attention never looks ahead), and
        the last block runs at the <eot> alone (``Transformer.forward_pooled``). Exact, and cheaper
        than ``forward_head(forward_features(tokens))``, the more so the more padding there is."""
        eot = self.eot_index(tokens)
        tokens = tokens[:, : int(eot.max()) + 1] if tokens.shape[0] else tokens
        L = tokens.shape[1]
        if self.cfg.context_length < L:
            raise ValueError(f"{L} tokens exceed the context length {self.cfg.context_length}")
        x = self.token_embed(tokens) + self.pos_embed[:L]  # (B, L, W)
        return self.ln_final(self.transformer.forward_pooled(x, eot, causal=True)) @ self.proj

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) position of each text's first <eot>; the last position for a text without one."""
        is_eot = tokens == self.cfg.eot_id
        last = torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        return torch.where(is_eot.any(dim=-1), is_eot.int().argmax(dim=-1), last)


@dataclass
class AudioEncoderConfig:
    """A small CNN over log-mel spectrograms (as in PANNs, Kong et al., 2020), giving tokens over time."""

    n_mels: int = field(64, "mel bands of the input (B, n_mels, frames)")
    width: int = field(128, "token width")
    arch: Literal["2d", "1d"] = field(
        "2d",
        "2d: convolutions over (frequency, time), PANNs-style; 1d: convolutions over time with the mel bands as "
        "channels (each filter sees the whole spectrum: pitch is read directly; about 50x cheaper on a CPU)",
    )
    channels: int = field(32, "channels of the first conv block; each further block doubles them (2d)")
    layers: int = field(3, "conv blocks; each halves the mel bands (2d: n_mels must divide by 2**layers)")
    time_stride: int = field(2, "each block divides the frames by this (1 keeps one token per frame)")
    norm: Literal["batch", "group"] = field(
        "batch", "normalisation after every conv: BatchNorm, or GroupNorm (8 groups; for tiny batches)"
    )
    input_norm: Literal["batch", "utterance", "none"] = field(
        "batch",
        "input normalisation: 'batch' is a BatchNorm per mel band (learned affine, running statistics of the "
        "data; keeps absolute level, so loudness stays audible); 'utterance' standardises each example by "
        "its own mean and std (level-invariant); 'none' leaves the log-mel as it is",
    )


def _norm1d(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels), channels)


def _norm2d(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels), channels)


class AudioEncoder(nn.Module):
    """Log-mel spectrograms (B, n_mels, frames) to tokens over time (B, T, width) and a pooled (B, width).

    Each block is conv 3x3 -> norm -> GELU -> conv 3x3 -> norm -> GELU -> average pool (2 in frequency,
    ``time_stride`` in time). Normalisation after every convolution matters: fusion models built on
    encoders without it stayed at chance. The remaining frequency rows are not averaged away but
    flattened with the channels and projected to the token width, so a token knows *where* in the
    spectrum its energy is: absolute frequency is pitch, and convolutions alone are blind to it.
    """

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        if cfg.layers < 1 or (cfg.arch == "2d" and cfg.n_mels % 2**cfg.layers):
            raise ValueError(f"n_mels {cfg.n_mels} must be divisible by 2**layers = {2**cfg.layers} (layers >= 1)")
        self.cfg, self.width = cfg, cfg.width
        self.input_norm = nn.BatchNorm1d(cfg.n_mels) if cfg.input_norm == "batch" else None
        one_d = cfg.arch == "1d"  # 1-D: the mel bands are the input channels; 2-D: one input channel
        conv, norm = (nn.Conv1d, _norm1d) if one_d else (nn.Conv2d, _norm2d)
        blocks: list[nn.Module] = []
        c_in = cfg.n_mels if one_d else 1
        for k in range(cfg.layers):
            c = cfg.channels * 2**k
            pool = (nn.AvgPool1d(cfg.time_stride, ceil_mode=True) if one_d
                    else nn.AvgPool2d((2, cfg.time_stride), ceil_mode=True))  # fmt: skip
            blocks += [
                conv(c_in, c, 3, padding=1, bias=False),
                norm(cfg.norm, c),
                nn.GELU(),
                conv(c, c, 3, padding=1, bias=False),
                norm(cfg.norm, c),
                nn.GELU(),
                pool,
            ]
            c_in = c
        self.body = nn.Sequential(*blocks)
        self.proj = nn.Linear(c_in if one_d else c_in * (cfg.n_mels // 2**cfg.layers), cfg.width)
        self.ln = nn.LayerNorm(cfg.width)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, frames) log-mel -> the same shape, normalised as ``cfg.input_norm`` says."""
        if x.dim() != 3 or x.shape[1] != self.cfg.n_mels:
            raise ValueError(f"expected log-mel of shape (B, {self.cfg.n_mels}, frames), got {tuple(x.shape)}")
        x = x.float()
        if self.cfg.input_norm == "batch":
            return self.input_norm(x)
        if self.cfg.input_norm == "utterance":
            mean, std = x.mean(dim=(1, 2), keepdim=True), x.std(dim=(1, 2), keepdim=True)
            return (x - mean) / (std + 1e-5)
        return x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Log-mel (B, n_mels, frames) -> tokens (B, T, width), T = frames / time_stride**layers (rounded up)."""
        if self.cfg.arch == "1d":
            h = self.body(self.normalize_input(x)).transpose(1, 2)  # (B, T, C)
            return self.ln(self.proj(h))
        h = self.body(self.normalize_input(x)[:, None])  # (B, C, n_mels / 2**layers, T)
        h = h.flatten(1, 2).transpose(1, 2)  # (B, T, C * F)
        return self.ln(self.proj(h))  # (B, T, width)

    forward_features = forward_tokens  # the name the other encoders use

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, width) -> (B, width), their mean over time."""
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-mel (B, n_mels, frames) -> (B, width)."""
        return self.forward_head(self.forward_tokens(x))
