"""Pretrained CLIP and SigLIP (``hf:`` models, :class:`mmfusion.backends.hf.HFEmbedder`) to ONNX: the same two
graphs as a native export, with the model's own fast tokenizer and its image processor's settings beside them,
which :class:`mmfusion.backends.ort.OrtHFEmbedder` re-does without torch or transformers.

CLIP's text graph takes ``input_ids`` and ``attention_mask`` (texts padded to the longest in the batch); SigLIP's
takes ``input_ids`` alone, padded to the fixed length it was trained with, as its processor does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends.hf import HFEmbedder, _features
from ..backends.ort import EXPORT_FORMAT, IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE
from ..version import __version__


class HFImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))  # (B, D)


class HFTextTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kw = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids,
                                                                      "attention_mask": attention_mask}  # fmt: skip
        return _features(self.model.get_text_features(**kw))  # (B, D)


def _plain(size: Any) -> dict[str, int] | None:
    """A processor's size (a dict or transformers' SizeDict) as a plain dict of its set values."""
    if size is None:
        return None
    items = size.items() if isinstance(size, dict) else ((k, getattr(size, k, None)) for k in
                                                          ("shortest_edge", "height", "width"))  # fmt: skip
    return {k: int(v) for k, v in items if isinstance(v, int) and k in ("shortest_edge", "height", "width")} or None


def image_config(ip: Any) -> dict[str, Any]:
    """What :class:`~mmfusion.backends.ort.HFPreprocess` needs from the image processor; an error for settings
    it does not re-do."""
    size = _plain(getattr(ip, "size", None))
    if not getattr(ip, "do_resize", True) or not size or set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(f"{type(ip).__name__} resizes with {size}; ONNX export re-does a shortest-edge resize or a "
                         "fixed height and width only")  # fmt: skip
    crop = _plain(getattr(ip, "crop_size", None)) if getattr(ip, "do_center_crop", False) else None
    rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
    normalize = getattr(ip, "do_normalize", True)
    return {
        "file": IMAGE_FILE,
        "preprocess": "transformers PIL image processor: resize, centre crop, rescale (float64), normalise",
        "size": size,
        "crop_size": crop,
        "resample": int(getattr(ip, "resample", 3)),
        "rescale_factor": rescale,
        "mean": [float(m) for m in ip.image_mean] if normalize else [0.0, 0.0, 0.0],
        "std": [float(s) for s in ip.image_std] if normalize else [1.0, 1.0, 1.0],
        "input_size": max(size.values()),
    }


def text_config(emb: HFEmbedder) -> dict[str, Any]:
    tok = emb.tokenizer
    kw = emb._text_kwargs
    positions = emb.model.config.text_config.max_position_embeddings  # the most the model takes
    max_length = kw.get("max_length") or min(tok.model_max_length, positions)
    return {
        "file": TEXT_FILE,
        "tokenizer": TOKENIZER_FILE,
        "max_length": max_length,
        "padding": "max_length" if kw.get("padding") == "max_length" else "longest",
        "pad_id": tok.pad_token_id,
        "pad_token": tok.pad_token,
        "inputs": ["input_ids", "attention_mask"] if emb.model_type == "clip" else ["input_ids"],
    }


def _export(module: nn.Module, args: tuple, path: Path, names: list[str], opset: int) -> None:
    axes = {n: {0: "batch", 1: "length"} for n in names if n != "pixel_values"}
    axes |= {"pixel_values": {0: "batch"}} if "pixel_values" in names else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=names, output_names=["embeddings"],
            dynamic_axes={**axes, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
        )  # fmt: skip


def write_hf_towers(emb: HFEmbedder, directory: Path, opset: int) -> dict[str, Any]:
    """image.onnx, text.onnx and tokenizer.json into ``directory``; returns the export config."""
    if emb.int8_agreement is not None or emb.dtype != torch.float32 or emb.device.type != "cpu":
        raise ValueError(f"{emb.name}: export the fp32 model on the CPU (load it without --quantize or --dtype), "
                         "then quantise the export with mmfusion quantize")  # fmt: skip
    model = emb.model.eval()
    img, txt = image_config(emb.image_processor), text_config(emb)
    h, w = (img["crop_size"] or img["size"]).get("height"), (img["crop_size"] or img["size"]).get("width")
    side = img["input_size"]
    pixels = torch.zeros(2, 3, h or side, w or side)
    tok = emb.tokenizer(["a photo", "two red circles on the left"], return_tensors="pt", **emb._text_kwargs)
    _export(HFImageTower(model), (pixels,), directory / IMAGE_FILE, ["pixel_values"], opset)
    _export(HFTextTower(model), tuple(tok[k] for k in txt["inputs"]), directory / TEXT_FILE, txt["inputs"], opset)
    (directory / TOKENIZER_FILE).write_text(emb.tokenizer.backend_tokenizer.to_str())
    bias = getattr(model, "logit_bias", None) if emb.model_type == "siglip" else None
    return {
        "format": EXPORT_FORMAT,
        "family": "hf-clip",
        "model_type": emb.model_type,
        "source": emb.name,
        "precision": "fp32",
        "embed_dim": emb.embed_dim,
        "image": img,
        "text": txt,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": float(bias.detach()) if bias is not None else None,
        "fingerprint": emb.fingerprint,
        "meta": {},
        "opset": opset,
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "mmfusion_version": __version__,
    }
