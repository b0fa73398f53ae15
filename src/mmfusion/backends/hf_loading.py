"""Loading a Hugging Face checkpoint behind an mmfusion interface: the steps every generation adapter repeats.

The captioning, speech and VQA adapters each load the same way: make sure transformers is there, check the
checkpoint is of their family and made for their task (a BLIP for VQA is also "blip", and loaded as a
captioner it would give random output), load the model (a ``save_pretrained`` directory or a hub id,
``local_files_only`` when offline or cached, device, dtype, int8 or bitsandbytes quantisation) and then its
processor with the same ``local_files_only``. :func:`load_family` does these in that order, once, with the
error messages of the steps in :mod:`mmfusion.backends.hf`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .hf import check_family, load_hf_model, load_processor, require_transformers


@dataclass(frozen=True)
class HFFamily:
    """A checkpoint family an adapter takes: what its config must say, and the transformers classes it loads."""

    model_type: str  # the config's model_type: "blip", "whisper"
    architecture: str  # the transformers model class, which the config's architectures must list when it has them
    processor: str  # the transformers processor class: "BlipProcessor"
    interface: str  # what the adapter does, for error messages: "captioning", "transcription"
    example: str  # a hub id of the right kind, for error messages

    def check(self, source: str) -> dict[str, Any]:
        """The config of ``source``, after checking it is of this family and architecture (ValueError if not)."""
        return check_family(source, self.model_type, self.architecture, self.interface, self.example)


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with its processor and the name it was loaded by."""

    model: Any
    processor: Any
    device: torch.device
    name: str  # "hf:<source>"


def load_family(source: str, family: HFFamily, *, device=None, dtype=None, quantize=None) -> LoadedModel:
    """Check ``source`` is of ``family``, then load its model and processor.

    Args:
        source: a hub id (read from the Hugging Face cache when there) or a ``save_pretrained`` directory.
        family: what the checkpoint must be, and the classes to load it with.
        device, dtype, quantize: as for :func:`mmfusion.backends.hf.load_hf_model`.

    Raises:
        ValueError: another family, or the family's checkpoint for another task.
        ModelNotFoundError: neither a local directory nor in the cache (and downloading is not possible).
    """
    transformers = require_transformers()
    family.check(source)
    processor_cls = getattr(transformers, family.processor)
    return load_with_processor(
        source,
        getattr(transformers, family.architecture),
        lambda src, local_only: load_processor(processor_cls, src, local_only),
        device=device,
        dtype=dtype,
        quantize=quantize,
    )


def load_with_processor(
    source: str,
    model_cls: Any,
    processor: Callable[[str, bool], Any],
    *,
    device=None,
    dtype=None,
    quantize=None,
) -> LoadedModel:
    """``model_cls`` from ``source`` with mmfusion's device, precision and offline rules, then its processor.

    Args:
        processor: ``(source, local_files_only) -> processor``, called with the ``local_files_only`` the model
            was loaded with, so both come from the same place.
    """
    model, local_only, dev = load_hf_model(model_cls, source, device=device, dtype=dtype, quantize=quantize)
    return LoadedModel(model, processor(source, local_only), dev, f"hf:{source}")


__all__ = ["HFFamily", "LoadedModel", "load_family", "load_with_processor"]
