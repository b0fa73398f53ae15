"""The interfaces the applications (index, service, evaluation) program against.

Native models and pretrained backends implement them, so callers never care which they have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class Embedder(Protocol):
    """Maps images and texts into one space where matching pairs are close."""

    name: str

    @property
    def embed_dim(self) -> int: ...

    def encode_image(
        self, images: Image.Image | Sequence[Image.Image] | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """(N, D) embeddings, L2-normalised unless ``normalize=False``."""
        ...

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, D) embeddings, L2-normalised unless ``normalize=False``."""
        ...
