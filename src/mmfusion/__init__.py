"""mmfusion: align, fuse, search and answer across images, text, audio and video.

The Python API in one place::

    import mmfusion
    model = mmfusion.load("runs/demo/clip")          # any checkpoint directory
    image_emb = model.encode_image([pil_image])      # (1, D), L2-normalised
    text_emb = model.encode_text(["a red circle"])   # (1, D)
"""

__version__ = "0.1.0"

from .models import create_model, list_models, load, save_model  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "load", "save_model"]
