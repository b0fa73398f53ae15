"""Video encoders: TimeSformer (Bertasius et al., 2021) with divided space-time attention, and two baselines.

All three cut every frame into patches (one strided convolution, shared by the frames) and return one
feature vector per clip:

- ``divided`` (TimeSformer): each block first lets every patch attend to the patches at the *same place* in
  the other frames (time attention, sequences of T), then to the other patches of its *own frame* (space
  attention, sequences of 1 + N with the class token), then an MLP. Both are batched reshapes of one
  (B, T, N, D) tensor: time attention sees it as (B*N, T, D), space attention as (B*T, N, D). As in the
  paper's code, the class token joins space attention in every frame (a copy per frame, the outputs
  averaged) and not time attention. The paper's extra linear layer after time attention (``temporal_fc``,
  zero-initialised so blocks loaded from an image model start as image blocks) is left out: it composes
  with the attention's own output projection into one linear map.
- ``joint``: every block attends over all 1 + T*N tokens at once (a plain ViT over the clip's patches):
  what divided attention approximates, at a cost quadratic in T*N.
- ``pool``: a ViT over each frame on its own, its class-token features averaged over time (as CLIP-based
  video models pool frame features). Blind to frame order by construction: a baseline for what order adds.

:meth:`DividedSpaceTimeBlock.forward_reference` computes the same block with Python loops over patches and
frames, one small attention per sequence: the plain reading of the method, kept to test the batched version
against and to measure what batching saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import field
from .encoders import VisionConfig, VisionTransformer
from .layers import MLP, Attention, Block, init_blocks

ATTENTIONS = ("divided", "joint", "pool")


@dataclass
class VideoEncoderConfig:
    """A video transformer over clips of ``frames`` frames of ``image_size`` pixels."""

    attention: Literal["divided", "joint", "pool"] = field(
        "divided",
        "divided: TimeSformer's time-then-space attention; joint: attention over all space-time patches; "
        "pool: a ViT per frame, features averaged over time (ignores frame order)",
    )
    frames: int = field(8, "frames per clip (the time embedding has one row per frame)")
    image_size: int = field(32, "side of the square frames")
    patch_size: int = field(8, "side of the square patches; image_size must be a multiple")
    width: int = field(96, "token width")
    layers: int = field(4, "transformer blocks")
    heads: int = field(4, "attention heads")
    mlp_ratio: float = field(2.0, "hidden width of the MLP as a multiple of width")
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = field("gelu", "MLP activation")


class DividedSpaceTimeBlock(nn.Module):
    """x + time_attn(ln(x)), then x + space_attn(ln(x)) per frame with the class token, then x + mlp(ln(x)).

    Tokens are (B, 1 + T*N, D): the class token, then the patches frame by frame (``(t n)`` order).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0, act: str = "gelu"):
        super().__init__()
        self.ln_time = nn.LayerNorm(width)
        self.time_attn = Attention(width, heads)
        self.ln_space = nn.LayerNorm(width)
        self.space_attn = Attention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        B, L, D = x.shape
        T, N = frames, (L - 1) // frames
        cls, patches = x[:, :1], x[:, 1:]  # (B, 1, D), (B, T*N, D)
        # time: 'b (t n) d -> (b n) t d', each patch position across the frames
        h = patches.reshape(B, T, N, D).transpose(1, 2).reshape(B * N, T, D)
        h = self.time_attn(self.ln_time(h))  # (B*N, T, D)
        patches = patches + h.reshape(B, N, T, D).transpose(1, 2).reshape(B, T * N, D)
        # space: 'b (t n) d -> (b t) n d', each frame with its own copy of the class token
        s = torch.cat([cls.expand(B, T, D).reshape(B * T, 1, D), patches.reshape(B * T, N, D)], dim=1)
        s = self.space_attn(self.ln_space(s))  # (B*T, 1 + N, D)
        cls = cls + s[:, 0].reshape(B, T, D).mean(dim=1, keepdim=True)  # (B, 1, D): the frames' average
        patches = patches + s[:, 1:].reshape(B, T * N, D)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + T*N, D)
        return x + self.mlp(self.ln_mlp(x))

    def forward_reference(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """The same as :meth:`forward`, one patch position and one frame at a time (slow; for tests and
        benchmarks)."""
        B, L, D = x.shape
        T, N = frames, (L - 1) // frames
        cls, grid = x[:, :1], x[:, 1:].reshape(B, T, N, D)
        timed = []
        for n in range(N):  # time attention of patch position n: (B, T, D)
            seq = grid[:, :, n]
            timed.append(seq + self.time_attn(self.ln_time(seq)))
        grid = torch.stack(timed, dim=2)  # (B, T, N, D)
        cls_parts, frames_out = [], []
        for t in range(T):  # space attention of frame t, with the class token: (B, 1 + N, D)
            seq = torch.cat([cls, grid[:, t]], dim=1)
            out = self.space_attn(self.ln_space(seq))
            cls_parts.append(out[:, :1])
            frames_out.append(grid[:, t] + out[:, 1:])
        cls = cls + sum(cls_parts) / T
        x = torch.cat([cls, *frames_out], dim=1)
        return x + self.mlp(self.ln_mlp(x))


class VideoTransformer(nn.Module):
    """TimeSformer (``divided``) or a ViT over all space-time patches (``joint``); class-token features out.

    ``forward_features``: clips (B, T, 3, H, W) -> tokens (B, 1 + T*N, width); ``forward_head``: -> (B, width).
    """

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        if cfg.attention not in ("divided", "joint"):
            raise ValueError(f"VideoTransformer attends 'divided' or 'joint', not {cfg.attention!r}")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg, self.width = cfg, cfg.width
        self.patches = (cfg.image_size // cfg.patch_size) ** 2
        scale = cfg.width**-0.5
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(scale * torch.randn(cfg.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.patches, cfg.width))  # where in the frame
        self.time_embed = nn.Parameter(scale * torch.randn(cfg.frames, cfg.width))  # which frame
        self.ln_pre = nn.LayerNorm(cfg.width)
        if cfg.attention == "divided":
            self.blocks = nn.ModuleList(
                DividedSpaceTimeBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act) for _ in range(cfg.layers)
            )
        else:
            self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width)
        init_blocks(self.blocks, cfg.width)

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> input tokens (B, 1 + T*N, width): class token, then each frame's patches."""
        B, T = clips.shape[:2]
        if (T, *clips.shape[-2:]) != (self.cfg.frames, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"expected clips of shape (B, {self.cfg.frames}, 3, {self.cfg.image_size}, {self.cfg.image_size}), "
                f"got {tuple(clips.shape)}: sample {self.cfg.frames} frames and resize (data.video.read_video does)"
            )
        x = self.patch_embed(clips.flatten(0, 1))  # (B*T, W, h, w)
        x = x.flatten(2).transpose(1, 2).reshape(B, T, self.patches, -1)  # (B, T, N, W)
        x = x + self.pos_embed + self.time_embed[:, None]  # (B, T, N, W)
        cls = self.cls_token.expand(B, 1, -1)  # (B, 1, W)
        return torch.cat([cls, x.flatten(1, 2)], dim=1)  # (B, 1 + T*N, W)

    def forward_features(self, clips: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Clips (B, T, 3, H, W) -> tokens (B, 1 + T*N, width). ``reference``: divided blocks run their
        loop implementation (the same numbers, slowly)."""
        x = self.ln_pre(self.embed(clips))
        for block in self.blocks:
            if isinstance(block, DividedSpaceTimeBlock):
                x = block.forward_reference(x, self.cfg.frames) if reference else block(x, self.cfg.frames)
            else:
                x = block(x)
        return self.ln_post(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # (B, width): the class token

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(clips))


class FramePooling(nn.Module):
    """A ViT over every frame alone, its features averaged over time: (B, T, 3, H, W) -> (B, width)."""

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg, self.width = cfg, cfg.width
        vision = VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                              layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act)  # fmt: skip
        self.vit = VisionTransformer(vision, cfg.width)

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (B, T, 3, H, W) -> per-frame features (B, T, width)."""
        B, T = clips.shape[:2]
        return self.vit(clips.flatten(0, 1)).reshape(B, T, -1)  # (B*T, W) -> (B, T, W)

    def forward_head(self, frame_features: torch.Tensor) -> torch.Tensor:
        return frame_features.mean(dim=1)  # (B, width)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(clips))


def build_video_encoder(cfg: VideoEncoderConfig) -> VideoTransformer | FramePooling:
    match cfg.attention:
        case "divided" | "joint":
            return VideoTransformer(cfg)
        case "pool":
            return FramePooling(cfg)
    raise ValueError(f"unknown video attention {cfg.attention!r}; choose from {', '.join(ATTENTIONS)}")


def count_flops(cfg: VideoEncoderConfig) -> dict[str, int]:
    """Forward FLOPs of one clip through the encoder's blocks (2 per multiply-add), by part, counted from
    the shapes: projections and MLPs (linear in the tokens) and attention scores and mixing (quadratic in
    each attended sequence). Layer norms, softmax and the patch embedding are left out."""
    T, N, D = cfg.frames, (cfg.image_size // cfg.patch_size) ** 2, cfg.width
    hidden = int(D * cfg.mlp_ratio)

    def attn(seqs: int, length: int) -> tuple[int, int]:  # (projections, scores + mixing)
        return 2 * seqs * length * 4 * D * D, 2 * seqs * 2 * length * length * D

    if cfg.attention == "divided":
        parts = [attn(N, T), attn(T, 1 + N)]
        tokens = 1 + T * N
    elif cfg.attention == "joint":
        parts = [attn(1, 1 + T * N)]
        tokens = 1 + T * N
    else:
        parts = [attn(T, 1 + N)]
        tokens = T * (1 + N)
    layers = cfg.layers
    return {
        "projections": layers * sum(p for p, _ in parts),
        "attention": layers * sum(a for _, a in parts),
        "mlp": layers * 2 * tokens * 2 * D * hidden,
    }
