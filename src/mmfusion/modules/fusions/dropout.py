"""Modality dropout: whole modalities of examples dropped in training, so a fusion learns to cope with missing
ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, check_some_present


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
        check_some_present(base, names)
        keep = base
        if self.training and self.p > 0:
            keep = base & (torch.rand(base.shape, device=device) >= self.p)
            pick = torch.rand(base.shape, device=device).masked_fill(~base, -1.0).argmax(dim=1)  # (B,)
            revive = F.one_hot(pick, len(names)).bool() & ~keep.any(dim=1, keepdim=True)  # (B, M)
            keep = keep | revive
        return {m: keep[:, i] for i, m in enumerate(names)}
