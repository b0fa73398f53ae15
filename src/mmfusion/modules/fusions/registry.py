"""The fusion strategies by name, and :func:`build_fusion` to build one from its name and options."""

from __future__ import annotations

from .attention import AttentionFusion
from .base import Fusion
from .cross_attention import CrossAttentionFusion
from .early_late import ConcatFusion, LateFusion
from .gated import GatedCrossAttentionFusion
from .lowrank import LowRankFusion
from .unified import UnifiedFusion

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
