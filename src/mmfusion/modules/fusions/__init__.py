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
strategy by its name in :data:`FUSIONS`. One strategy (or one small family) per module; this package
re-exports them all, so ``from mmfusion.modules.fusions import X`` is the import to use.
"""

from .attention import AttentionFusion
from .base import Features, Fusion
from .blocks import CrossModalAttentionBlock, GatedCrossAttentionBlock
from .cross_attention import CrossAttentionFusion
from .dropout import ModalityDropout
from .early_late import ConcatFusion, LateFusion
from .gated import GatedCrossAttentionFusion
from .lowrank import LowRankFusion
from .registry import FUSIONS, build_fusion
from .unified import UnifiedFusion

__all__ = [
    "FUSIONS",
    "AttentionFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "CrossModalAttentionBlock",
    "Features",
    "Fusion",
    "GatedCrossAttentionBlock",
    "GatedCrossAttentionFusion",
    "LateFusion",
    "LowRankFusion",
    "ModalityDropout",
    "UnifiedFusion",
    "build_fusion",
]
