"""Models from elsewhere behind mmfusion's interfaces, and the one loader that takes any model name.

:func:`load` is what ``mmfusion.load``, the CLI's ``--model`` and the service use: a native checkpoint
directory, ``hf:<hub-id>`` or a directory written by ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model needs it: an ONNX export (backends/ort.py) runs without it
    import torch

    from ..interfaces import Embedder


def load(spec: str | os.PathLike, device: str | torch.device | None = None, **kwargs):
    """Load any model by name.

    Args:
        spec: a native checkpoint directory (or a training run's directory), ``hf:<hub-id>``, ``hf:<dir>``,
            a directory written by Hugging Face ``save_pretrained``, or one written by ``mmfusion export onnx``
            (run on ONNX Runtime, without torch).
        device: where to run it; default CPU for native checkpoints, CUDA when present for pretrained ones.
        **kwargs: ``quantize="int8"`` (dynamic int8 on CPU, any torch model); for pretrained models also
            ``dtype=`` and the GPU ``quantize`` modes (see :func:`mmfusion.backends.hf.load_pretrained`).
    """
    from .ort import is_export_dir

    if is_export_dir(spec):  # written by `mmfusion export onnx`: ONNX Runtime, no torch
        from .ort import load_export

        return load_export(spec, device=None if device is None else str(device), **kwargs)
    from .hf import hf_source

    if hf_source(spec) is not None:
        from .hf import load_pretrained

        return load_pretrained(spec, device=device, **kwargs)
    from ..models import load as load_native

    quantize = kwargs.pop("quantize", None)
    if kwargs:
        raise ValueError(f"{', '.join(kwargs)} apply to Hugging Face models only; {os.fspath(spec)} is native")
    if quantize in (None, "none"):
        return load_native(spec, device=device or "cpu")
    if quantize != "int8":
        raise ValueError(f"--quantize {quantize} is for Hugging Face models on a GPU; native models take int8 (CPU)")
    if device is not None and str(device) != "cpu":
        raise ValueError("int8 dynamic quantisation runs on CPU; drop --device or give --device cpu")
    from ..models.checkpoint import resolve_checkpoint, weights_fingerprint
    from ..models.int8 import native_int8

    model = load_native(spec, device="cpu")
    if getattr(model, "precision", "").startswith("int8"):
        return model  # a checkpoint kept as int8 is int8 already
    return native_int8(model, weights_fingerprint(resolve_checkpoint(spec)))


def model_fingerprint(model: Embedder) -> str:
    """What identifies the model's weights: its own ``fingerprint`` when it has one (pretrained models hash
    their weight files, so precision and device do not change it), else a hash of a module's state dict, else
    its name."""
    own = getattr(model, "fingerprint", None)
    if isinstance(own, str) and own:
        return own
    import torch

    h = hashlib.sha256()
    if isinstance(model, torch.nn.Module):
        for key, t in sorted(model.state_dict().items()):
            if not isinstance(t, torch.Tensor):
                continue
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(str(getattr(model, "name", type(model).__name__)).encode())
    return h.hexdigest()[:16]
