"""The checkpoint format every native model shares, and the one loader that rebuilds any of them.

A checkpoint is a directory::

    config.json          {"format", "family", "name", "config", "mmfusion_version"}
    model.safetensors    the weights (never a pickle)
    tokenizer.json       for models that read text
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError, from_dict
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer
from ..utils.checkpoint_files import CONFIG_FILE, WEIGHTS_FILE, find_checkpoint
from ..utils.io import atomic_replace_dir, atomic_write_json
from ..version import __version__
from .int8 import INT8, native_int8
from .registry import FAMILIES, build_model, list_models

FORMAT = "mmfusion.checkpoint/1"
_CORE_KEYS = ("format", "family", "name", "config", "mmfusion_version")


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (a crash leaves the old one or the new one, whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_model_files(model, tmp, extra)
        return atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(model: nn.Module, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """config.json, model.safetensors and tokenizer.json into an existing directory."""
    family = getattr(model, "family", None)
    if family not in FAMILIES or not FAMILIES[family].native:
        raise TypeError(f"cannot save {type(model).__name__}: not a registered mmfusion model family")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "family": family,
        "name": getattr(model, "name", family),
        "config": asdict(model.cfg),
        "mmfusion_version": __version__,
        **(getattr(model, "meta", None) or {}),
        **(extra or {}),
    }
    atomic_write_json(directory / CONFIG_FILE, meta)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        tok.save(directory / TOKENIZER_FILE)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for a path: the directory itself, or the ``model/`` of a training run."""
    path = Path(path)
    found = find_checkpoint(path)
    if found is not None:
        return found
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {path}: give a checkpoint directory (config.json + model.safetensors) "
            f"or a training run's output directory, or a preset name: {', '.join(list_models())}"
        )
    raise FileNotFoundError(
        f"{path} is not an mmfusion checkpoint: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
        f"(or a model/ folder holding them, as `mmfusion train` writes)"
    )


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild any mmfusion model from its checkpoint directory, in eval mode.

    Args:
        path: a checkpoint directory, or a training run's output directory (its ``model/`` is used).
        device: where to put the weights.
    """
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    family = meta.get("family")
    if family not in FAMILIES or not FAMILIES[family].native:
        native = [name for name, spec in FAMILIES.items() if spec.native]
        raise ConfigError(f"{ckpt / CONFIG_FILE}: unknown model family {family!r}; known: {', '.join(native)}")
    spec = FAMILIES[family]
    cfg = from_dict(spec.config, meta["config"], prefix="model.")
    tokenizer = None
    if (ckpt / TOKENIZER_FILE).is_file():
        context = getattr(getattr(cfg, spec.text_field or "", None), "context_length", 77)
        tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE, context)
    model = build_model(family, cfg, tokenizer, name=meta.get("name") or str(path))
    model.meta = {k: v for k, v in meta.items() if k not in _CORE_KEYS}  # e.g. what it was trained on
    state = load_file(str(ckpt / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model = model.to(device).eval()
    if model.meta.get("quantize") == INT8:  # kept by `mmfusion quantize --runtime torch`: int8 as it was measured
        model = native_int8(model, weights_fingerprint(ckpt), bool(model.meta.get("per_channel")))
    return model


def weights_fingerprint(ckpt: Path) -> str:
    """A hash of a checkpoint's weight file: what identifies the model whatever it is loaded as."""
    h = hashlib.sha256()
    with open(ckpt / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
