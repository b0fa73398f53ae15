"""mmfusion: align, fuse, search and answer across images, text, audio and video.

The Python API in one place::

    import mmfusion
    model = mmfusion.load("runs/demo/clip")          # a checkpoint directory, or "hf:openai/clip-vit-base-patch32"
    image_emb = model.encode_image([pil_image])      # (1, D), L2-normalised
    text_emb = model.encode_text(["a red circle"])   # (1, D)

    clf = mmfusion.ZeroShotClassifier(model, ["cat", "dog"])      # labels with prompt ensembles
    mmfusion.load("hf:Salesforce/blip-image-captioning-base").caption(["photo.jpg"])
"""

from .backends import load
from .version import __version__

# imported on first use: ``import mmfusion`` loads no torch, so an ONNX export (``mmfusion.load(dir)``) runs without it
_LAZY = {
    "create_model": "models", "list_models": "models", "save_model": "models",
    "ZeroShotClassifier": "tasks", "best_caption": "tasks", "moderate": "tasks", "Index": "index",
}  # fmt: skip
_SUBPACKAGES = {
    "backends", "cli", "config", "data", "eval", "export", "index", "interfaces", "models", "modules", "serve", "tasks",
    "train", "utils",
}  # fmt: skip


def __getattr__(name: str):
    """Heavier parts are imported on first use, so ``import mmfusion`` stays quick."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBPACKAGES:  # ``mmfusion.models.x`` without importing mmfusion.models first
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mmfusion' has no attribute {name!r}")


__all__ = ["__version__", "load", *_LAZY]
