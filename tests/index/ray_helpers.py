"""Models for the Ray tests that travel to the actors by value (cloudpickle), so workers need not import tests."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mmfusion.backends import model_fingerprint


class Wrapped:
    """An Embedder that behaves as ``model`` (same weights, same fingerprint) and adds a fault or a delay.

    Args:
        model: the real Embedder.
        die_at: the actor process SIGKILLs itself on this call of encode_image, once per ``marker`` file (the
            file is written first, so the restarted actor goes on normally).
        delay_s: sleep this long in each encode_image call (a model that takes real time per batch).
        stall_after: from this call on, sleep ``stall_s`` first (a run that is surely still going).
    """

    def __init__(
        self, model, marker: Path | None = None, die_at: int = 0, delay_s: float = 0.0, stall_after: int = 0,
        stall_s: float = 0.0,
    ):  # fmt: skip
        self.model, self.marker, self.die_at, self.delay_s = model, marker, die_at, delay_s
        self.stall_after, self.stall_s = stall_after, stall_s
        self.fingerprint = model_fingerprint(model)
        self.calls = 0

    def __getattr__(self, name):  # transform, embed_dim, name, device, encode_text...
        if name.startswith("__") or "model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.model, name)

    def encode_image(self, images, normalize: bool = True):
        self.calls += 1
        if self.marker is not None and self.calls == self.die_at and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the actor's process dies mid-batch, as on a lost machine
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.stall_after and self.calls >= self.stall_after:
            time.sleep(self.stall_s)
        return self.model.encode_image(images, normalize=normalize)
