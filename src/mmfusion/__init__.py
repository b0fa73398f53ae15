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
from .models import create_model, list_models, save_model
from .version import __version__

_LAZY = {"ZeroShotClassifier": "tasks", "best_caption": "tasks", "moderate": "tasks", "Index": "index"}


def __getattr__(name: str):
    """Heavier parts are imported on first use, so ``import mmfusion`` stays quick."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mmfusion' has no attribute {name!r}")


__all__ = ["__version__", "create_model", "list_models", "load", "save_model", *_LAZY]
