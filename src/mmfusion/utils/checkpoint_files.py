"""The files of an mmfusion checkpoint directory, and finding one, without torch (the torch-free service reads
model cards with it; :mod:`mmfusion.models.checkpoint` writes and loads checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint directory for a path: the directory itself, or the ``model/`` of a training run; None when
    neither holds a config and weights."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None
