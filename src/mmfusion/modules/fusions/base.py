"""What every fusion strategy shares: the checks on ``dims`` and the conversion of inputs to masked tensors
(the contract every fusion keeps is in the package docstring, :mod:`mmfusion.modules.fusions`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

Features = dict[str, torch.Tensor]


def masked_mean(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, D) over the positions where ``pad`` (B, T) is False; zeros where all are padding."""
    keep = (~pad).unsqueeze(-1)  # (B, T, 1)
    total = x.masked_fill(~keep, 0.0).sum(dim=1)  # (B, D)
    return total / keep.sum(dim=1).clamp(min=1).to(x.dtype)


def check_some_present(mask: torch.Tensor, names: tuple[str, ...] | list[str]) -> None:
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
        check_some_present(mask, self.modalities)
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
        return [masked_mean(x, pad) for x, pad in zip(tokens, pads)], mask

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


def projection(dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width))
