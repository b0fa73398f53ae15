"""Fusion strategies: ways to combine the features of several named modalities into one vector.

- :class:`ConcatFusion` ("concat"): early fusion, an MLP over the concatenated modality vectors.
- :class:`LateFusion` ("late"): one classifier per modality, logits combined by a mean, learned weights or a
  product of experts (Hinton, 2002).
- :class:`AttentionFusion` ("attention"): a softmax over modalities of a learned score, per example.
- :class:`CrossAttentionFusion` ("cross_attention"): each modality's tokens attend to the other modalities'
  tokens (cross-modal transformers, as in MulT, Tsai et al., 2019).
- :class:`GatedCrossAttentionFusion` ("gated"): a primary modality attends to the others through tanh-gated
  blocks that start as the identity (Flamingo, Alayrac et al., 2022).
- :class:`UnifiedFusion` ("unified"): every modality projected into one shared space and averaged.
- :class:`LowRankFusion` ("lowrank"): the multiplicative tensor fusion of all modalities with low-rank
  factors (Liu et al., 2018, "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors").

Every fusion takes ``dims`` (the feature width of each modality, by name) and ``width`` (the fused width),
and its forward takes ``features`` (pooled ``(B, D_m)`` or tokens ``(B, T_m, D_m)`` per modality), an
optional ``present`` mask (bool ``(B,)`` per modality: which examples have it) and optional ``padding``
masks (bool ``(B, T_m)``, True at padding tokens), returning ``(B, out_dim)``. A modality left out of
``features`` is missing for every example. Inputs under a mask (padding tokens, absent examples) are
replaced by zeros before anything reads them, so not even a NaN there reaches the output.

:class:`ModalityDropout` drops whole modalities of examples in training, and :func:`build_fusion` builds a
strategy by its name in :data:`FUSIONS`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP

Features = dict[str, torch.Tensor]


def _masked_mean(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, D) over the positions where ``pad`` (B, T) is False; zeros where all are padding."""
    keep = (~pad).unsqueeze(-1)  # (B, T, 1)
    total = x.masked_fill(~keep, 0.0).sum(dim=1)  # (B, D)
    return total / keep.sum(dim=1).clamp(min=1).to(x.dtype)


def _check_some_present(mask: torch.Tensor, names: tuple[str, ...] | list[str]) -> None:
    """Raise unless every row of the (B, M) present mask has a True (a data-dependent check: one sync)."""
    empty = ~mask.any(dim=1)  # (B,)
    if not bool(empty.any()):
        return
    rows = empty.nonzero().flatten()[:5].tolist()
    raise ValueError(
        f"every example needs at least one present modality of {list(names)}, but examples {rows} have none; "
        "mark at least one modality present for each example, or leave such examples out of the batch"
    )


class Fusion(nn.Module):
    """What every strategy shares: the checks on ``dims`` and the conversion of inputs to masked tensors.

    Args:
        dims: feature width of each modality, by name; the order fixes the order of ``modalities``.
        width: fused width (``out_dim`` unless a strategy says otherwise).
    """

    produces_logits: ClassVar[bool] = False

    def __init__(self, dims: dict[str, int], width: int):
        super().__init__()
        if not dims:
            raise ValueError("a fusion needs at least one modality in dims, got an empty dict")
        for name, dim in dims.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"modality names must be Python identifiers (no dots or spaces), got {name!r}")
            if int(dim) < 1:
                raise ValueError(f"the feature width of modality {name!r} must be positive, got {dim}")
        if width < 1:
            raise ValueError(f"the fused width must be positive, got {width}")
        self.dims = {name: int(dim) for name, dim in dims.items()}
        self.modalities = tuple(dims)
        self.width = width
        self.out_dim = width

    def present_mask(self, features: Features, present: Features | None = None) -> torch.Tensor:
        """(B, M) bool: which modalities each example has, in ``modalities`` order."""
        unknown = sorted(set(features) - set(self.modalities)) + sorted(set(present or {}) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this fusion takes {list(self.modalities)}")
        if not features:
            raise ValueError(f"no features given; this fusion takes some of {list(self.modalities)}")
        sizes = {name: x.shape[0] for name, x in features.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"all modalities need the same batch size, got {sizes}")
        ref = next(iter(features.values()))
        B, device = ref.shape[0], ref.device
        columns = []
        for name in self.modalities:
            if name not in features:
                columns.append(torch.zeros(B, dtype=torch.bool, device=device))
            elif present is not None and name in present:
                p = present[name]
                if p.shape != (B,):
                    raise ValueError(f"present[{name!r}] should have shape ({B},), got {tuple(p.shape)}")
                columns.append(p.to(device=device, dtype=torch.bool))
            else:
                columns.append(torch.ones(B, dtype=torch.bool, device=device))
        mask = torch.stack(columns, dim=1)  # (B, M)
        _check_some_present(mask, self.modalities)
        return mask

    def token_inputs(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Tokens (B, T_m, D_m) and padding (B, T_m) of every modality, and the (B, M) present mask.

        A pooled input is one token. An absent modality (per example, or left out of ``features``) is all
        padding, and every padding token is zeroed.
        """
        mask = self.present_mask(features, present)
        ref = next(iter(features.values()))
        B = mask.shape[0]
        tokens, pads = [], []
        for i, name in enumerate(self.modalities):
            if name in features:
                x, pad = self._as_tokens(name, features[name], (padding or {}).get(name))
            else:
                x = ref.new_zeros(B, 1, self.dims[name])
                pad = torch.ones(B, 1, dtype=torch.bool, device=ref.device)
            pad = pad | ~mask[:, i, None]  # (B, T): an absent example's tokens are all padding
            tokens.append(x.masked_fill(pad.unsqueeze(-1), 0.0))
            pads.append(pad)
        return tokens, pads, mask

    def pooled_inputs(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Vectors (B, D_m) of every modality (tokens mean-pooled over non-padding; zeros where absent), and
        the (B, M) present mask."""
        tokens, pads, mask = self.token_inputs(features, present, padding)
        return [_masked_mean(x, pad) for x, pad in zip(tokens, pads)], mask

    def _as_tokens(self, name: str, x: torch.Tensor, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.dims[name]
        if x.dim() not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"features[{name!r}] should be (B, {D}) or (B, T, {D}), got {tuple(x.shape)}")
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, 1, D)
            pad = None  # a pooled vector has no padding
        if pad is None:
            return x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        if pad.shape != x.shape[:2]:
            raise ValueError(f"padding[{name!r}] should have shape {tuple(x.shape[:2])}, got {tuple(pad.shape)}")
        return x, pad.to(device=x.device, dtype=torch.bool)


def _projection(dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width))


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


class AttentionFusion(Fusion):
    """A weighted sum of the projected modalities, with weights from a softmax over a learned score.

    Each modality is projected to ``width`` (Linear + LayerNorm) and scored by a small MLP shared by all
    modalities; the softmax runs over the modalities each example has, so missing ones are masked: they
    get weight 0 and never change the output. ``last_weights`` (B, M) keeps the weights of the last call.

    Args:
        dims: feature width of each modality.
        width: output width.
        hidden: hidden width of the scoring MLP (default: ``width // 2``).
    """

    def __init__(self, dims: dict[str, int], width: int, hidden: int | None = None):
        super().__init__(dims, width)
        hidden = hidden or max(1, width // 2)
        self.proj = nn.ModuleDict({m: _projection(d, width) for m, d in self.dims.items()})
        # no bias on the score: a constant shift of every score leaves the softmax unchanged
        self.score = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))
        self.last_weights: torch.Tensor | None = None

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        xs, mask = self.pooled_inputs(features, present, padding)
        h = torch.stack([self.proj[m](x) for m, x in zip(self.modalities, xs)], dim=1)  # (B, M, W)
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, M)
        weights = scores.softmax(dim=-1)
        self.last_weights = weights.detach()
        return (weights.unsqueeze(-1) * h).sum(dim=1)  # (B, W)


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
        self.proj = nn.ModuleDict({m: _projection(d, width) for m, d in self.dims.items()})
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
        pooled = torch.stack([_masked_mean(x, pad) for x, pad in zip(xs, pads)], dim=1)  # (B, M, W)
        return self.norm(_masked_mean(pooled, ~mask))  # (B, W)


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
        self.proj = nn.ModuleDict({m: _projection(self.dims[m], width) for m in self.context_modalities})
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
        return self.head(_masked_mean(x, pad))  # (B, width)


class UnifiedFusion(Fusion):
    """A shared representation space: one Linear + LayerNorm per modality into ``width``, then the mean over
    the modalities each example has. Missing modalities are masked (they never change the output), and any
    number of modalities works.
    """

    def __init__(self, dims: dict[str, int], width: int):
        super().__init__(dims, width)
        self.proj = nn.ModuleDict({m: _projection(d, width) for m, d in self.dims.items()})

    def forward(
        self, features: Features, present: Features | None = None, padding: Features | None = None
    ) -> torch.Tensor:
        xs, mask = self.pooled_inputs(features, present, padding)
        h = torch.stack([self.proj[m](x) for m, x in zip(self.modalities, xs)], dim=1)  # (B, M, W)
        return _masked_mean(h, ~mask)  # (B, W)


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


class ModalityDropout(nn.Module):
    """Drops whole modalities of examples in training, so a fusion learns to cope with missing ones.

    In training each modality of each example is dropped with probability ``p``; an example that would lose
    all of its modalities gets one of them back, chosen uniformly (so the rate of dropping is a little
    under ``p``). In eval mode nothing is dropped. Either way the result is combined with ``present``.

    Args:
        p: probability of dropping each modality of each example.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"modality dropout p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, features: Features, present: Features | None = None) -> dict[str, torch.Tensor]:
        """Present masks, bool (B,), for each modality in ``features``."""
        if not features:
            raise ValueError("ModalityDropout needs at least one modality in features")
        names = list(features)
        ref = features[names[0]]
        B, device = ref.shape[0], ref.device
        given, everyone = present or {}, torch.ones(B, dtype=torch.bool, device=device)
        base = torch.stack(
            [given[m].to(device=device, dtype=torch.bool) if m in given else everyone for m in names], 1
        )  # (B, M)
        _check_some_present(base, names)
        keep = base
        if self.training and self.p > 0:
            keep = base & (torch.rand(base.shape, device=device) >= self.p)
            pick = torch.rand(base.shape, device=device).masked_fill(~base, -1.0).argmax(dim=1)  # (B,)
            revive = F.one_hot(pick, len(names)).bool() & ~keep.any(dim=1, keepdim=True)  # (B, M)
            keep = keep | revive
        return {m: keep[:, i] for i, m in enumerate(names)}


FUSIONS: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "late": LateFusion,
    "attention": AttentionFusion,
    "cross_attention": CrossAttentionFusion,
    "gated": GatedCrossAttentionFusion,
    "unified": UnifiedFusion,
    "lowrank": LowRankFusion,
}


def build_fusion(name: str, dims: dict[str, int], width: int, **kwargs) -> Fusion:
    """The fusion registered as ``name`` in :data:`FUSIONS`, built with its own options in ``kwargs``."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion strategy {name!r}; choose one of {', '.join(FUSIONS)}")
    return FUSIONS[name](dims, width, **kwargs)
