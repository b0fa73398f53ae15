"""One registry of model families and named presets, and the checkpoint format every model shares.

Presets are data: ``presets/<name>.json`` holds ``{"family", "description", "config"}``. Families
are registered explicitly in :data:`FAMILIES` (no registration by import side effect).

A checkpoint is a directory::

    config.json          {"format", "family", "name", "config", "mmfusion_version"}
    model.safetensors    the weights (never a pickle)
    tokenizer.json       for models that read text
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError, apply_overrides, from_dict, merge
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer
from ..utils.io import atomic_replace_dir, atomic_write_json
from .captioner import CaptionerConfig, CaptionModel
from .clip import CLIP, CLIPConfig
from .fusion import FusionClassifier, FusionConfig
from .video import VideoClassifier, VideoConfig
from .vqa import VQAConfig, VQAModel

PRESET_DIR = Path(__file__).parent / "presets"
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "clip": (CLIPConfig, CLIP),
    "fusion": (FusionConfig, FusionClassifier),
    "captioner": (CaptionerConfig, CaptionModel),
    "vqa": (VQAConfig, VQAModel),
    "video": (VideoConfig, VideoClassifier),
}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT = "mmfusion.checkpoint/1"
_CORE_KEYS = ("format", "family", "name", "config", "mmfusion_version")


def _presets() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(PRESET_DIR.glob("*.json"))}


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered presets matching a glob pattern (``list_models("clip-*")``)."""
    return [n for n in _presets() if fnmatch.fnmatch(n, pattern)]


def describe_models() -> list[tuple[str, str, str]]:
    """(name, family, description) for every preset."""
    return [(n, p["family"], p.get("description", "")) for n, p in _presets().items()]


def model_config(name: str, overrides: dict[str, Any] | list[str] | None = None) -> tuple[str, Any]:
    """The family and the config dataclass of a preset, with overrides applied.

    Args:
        name: a preset name from :func:`list_models`.
        overrides: a nested dict (``{"vision": {"layers": 2}}``) or ``["vision.layers=2"]``.
    """
    presets = _presets()
    if name not in presets:
        raise KeyError(f"unknown model preset {name!r}; available: {', '.join(presets)}")
    preset = presets[name]
    cfg_cls, _ = FAMILIES[preset["family"]]
    cfg = from_dict(cfg_cls, preset["config"], prefix="model.")
    if isinstance(overrides, list):
        cfg = apply_overrides(cfg, overrides)
    elif overrides:
        cfg = merge(cfg, overrides)
    return preset["family"], cfg


def build_model(family: str, cfg: Any, tokenizer: Tokenizer | None = None, name: str | None = None) -> nn.Module:
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    _, model_cls = FAMILIES[family]
    return model_cls(cfg, tokenizer=tokenizer, name=name or family)


def create_model(name: str, tokenizer: Tokenizer | None = None, **overrides: Any) -> nn.Module:
    """A freshly initialised model of a preset; keyword arguments override config fields.

    Example:
        >>> model = create_model("clip-tiny", vision={"layers": 2})
    """
    family, cfg = model_config(name, overrides)
    return build_model(family, cfg, tokenizer, name)


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (a crash leaves the old one or the new one, whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_model_files(model, tmp, extra)
        return atomic_replace_dir(tmp, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(model: nn.Module, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """config.json, model.safetensors and tokenizer.json into an existing directory."""
    from .. import __version__

    family = getattr(model, "family", None)
    if family not in FAMILIES:
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
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
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
    if family not in FAMILIES:
        raise ConfigError(f"{ckpt / CONFIG_FILE}: unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    cfg_cls, _ = FAMILIES[family]
    cfg = from_dict(cfg_cls, meta["config"], prefix="model.")
    tokenizer = None
    if (ckpt / TOKENIZER_FILE).is_file():
        text_cfg = getattr(cfg, "text", None) or getattr(cfg, "decoder", None) or getattr(cfg, "question", None)
        context = getattr(text_cfg, "context_length", 77)
        tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE, context)
    model = build_model(family, cfg, tokenizer, name=meta.get("name") or str(path))
    model.meta = {k: v for k, v in meta.items() if k not in _CORE_KEYS}  # e.g. what it was trained on
    state = load_file(str(ckpt / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()
