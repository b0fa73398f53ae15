"""mmfusion's own CLIP to ONNX: the image and text towers as two graphs with dynamic batch (and text length) axes,
checked by ``onnx.checker``, with the tokenizer and the preprocessing beside them, for
:class:`mmfusion.backends.ort.OrtEmbedder` to run without PyTorch.

The towers are traced with ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``): both graphs are
plain transformer blocks with no data-dependent control flow once the text tower's one shape-dependent
shortcut (dropping columns after the last ``<eot>``) is left to the runtime, which does it before the call.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends import model_fingerprint
from ..backends.ort import EXPORT_FILE, EXPORT_FORMAT, IMAGE_FILE, TEXT_FILE, is_export_dir
from ..data.tokenizer import EOT_ID, PAD_ID, SOT_ID, TOKENIZER_FILE
from ..models import CLIP
from ..utils.io import atomic_replace_dir, atomic_write_json
from ..version import __version__

log = logging.getLogger(__name__)
OPSET = 17  # LayerNormalization is one op from 17 on


class ImageTower(nn.Module):
    """Pixels (B, 3, S, S) -> image embeddings (B, D), not normalised (the runtime normalises)."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.visual = clip.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class TextTower(nn.Module):
    """Token ids (B, L) -> text embeddings (B, D) pooled at each text's first ``<eot>``, not normalised.

    ``TextTransformer.forward`` without its column cut (an ``int()`` of the data, which a trace would freeze);
    the runtime cuts the columns before calling, so the work is the same.
    """

    def __init__(self, clip: CLIP):
        super().__init__()
        self.text = clip.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.text
        L = tokens.shape[1]
        x = t.token_embed(tokens) + t.pos_embed[:L]  # (B, L, W)
        is_eot = tokens == t.cfg.eot_id  # (B, L)
        positions = torch.arange(L, device=tokens.device)  # (L,)
        eot = torch.where(is_eot.any(dim=-1), is_eot.int().argmax(dim=-1), positions[-1])  # (B,)
        return t.ln_final(t.transformer.forward_pooled(x, eot, causal=True)) @ t.proj  # (B, D)


def load_source(spec: str | os.PathLike) -> nn.Module:
    """The model to export: a native CLIP (a checkpoint or training-run directory, or a preset name: untrained,
    no tokenizer), or a pretrained CLIP/SigLIP (``hf:<hub-id>``, ``hf:<dir>``, a save_pretrained directory).

    Raises:
        ValueError: the model is neither (the message says what is exported).
    """
    from ..backends import load
    from ..backends.hf import HFEmbedder, hf_source
    from ..models import create_model, list_models
    from ..models import load as load_native

    text = os.fspath(spec)
    if hf_source(text) is not None:
        model = load(text, device="cpu", dtype="fp32")
        if not isinstance(model, HFEmbedder):
            raise ValueError(f"{text} is a {type(model).__name__}; `export onnx` exports CLIP and SigLIP embedders")
        return model
    if not Path(text).exists() and text in list_models():
        model = create_model(text)
        log.warning("exporting the untrained preset %s: random weights and no tokenizer", text)
    else:
        model = load_native(text)
    if not isinstance(model, CLIP):
        raise ValueError(
            f"{text} is a {getattr(model, 'family', type(model).__name__)} model; `export onnx` exports a CLIP "
            "(mmfusion train clip): its image and text towers"
        )
    return model.eval().float()


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, axes: dict[int, str],
            opset: int) -> None:  # fmt: skip
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=["embeddings"],
            dynamic_axes={input_name: axes, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
        )  # fmt: skip


def check_onnx(path: Path) -> None:
    """``onnx.checker`` over a written graph (by path, so graphs over 2 GB are checked too)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def export_config(model: CLIP, precision: str = "fp32", opset: int = OPSET) -> dict[str, Any]:
    """What ``export.json`` says: everything the runtime needs besides the graphs."""
    cfg = model.cfg
    bias = model.logit.bias
    return {
        "format": EXPORT_FORMAT,
        "family": "clip",
        "source": getattr(model, "name", "clip"),
        "precision": precision,
        "embed_dim": cfg.embed_dim,
        "image": {
            "file": IMAGE_FILE,
            "size": cfg.vision.image_size,
            "mean": list(cfg.image_mean),
            "std": list(cfg.image_std),
            "crop": "short side to size (bicubic), centre crop",
            "layout": "NCHW float32, RGB scaled to [0, 1], then (x - mean) / std",
        },
        "text": {
            "file": TEXT_FILE,
            "tokenizer": TOKENIZER_FILE if model.tokenizer is not None else None,
            "context_length": cfg.text.context_length,
            "dynamic_length": True,
            "pad_id": PAD_ID,
            "sot_id": SOT_ID,
            "eot_id": cfg.text.eot_id,
        },
        "logit_scale": float(model.logit().detach()),
        "logit_bias": float(bias.detach()) if bias is not None else None,
        "fingerprint": model_fingerprint(model),  # the same weights: an index built with the model accepts it
        "meta": dict(getattr(model, "meta", None) or {}),
        "opset": opset,
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "mmfusion_version": __version__,
    }


def write_towers(model: CLIP, directory: Path, opset: int = OPSET) -> None:
    """image.onnx, text.onnx and tokenizer.json into an existing directory, each graph checked."""
    cfg = model.cfg
    size, L = cfg.vision.image_size, cfg.text.context_length
    pixels = torch.zeros(2, 3, size, size)
    tokens = torch.full((2, L), PAD_ID, dtype=torch.long)
    tokens[:, 0], tokens[0, 1], tokens[0, 2], tokens[1, 1] = SOT_ID, 5, EOT_ID, EOT_ID
    _export(ImageTower(model), pixels, directory / IMAGE_FILE, "pixels", {0: "batch"}, opset)
    _export(TextTower(model), tokens, directory / TEXT_FILE, "tokens", {0: "batch", 1: "length"}, opset)
    for name in (IMAGE_FILE, TEXT_FILE):
        check_onnx(directory / name)
    if model.tokenizer is not None:
        model.tokenizer.save(directory / TOKENIZER_FILE)


def staging_dir(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` (same filesystem, so the final rename is atomic).

    Raises:
        FileExistsError: ``out`` exists and is not an export (never replace a folder that is something else).
    """
    out = Path(out)
    if out.exists() and not is_export_dir(out) and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not an mmfusion ONNX export; choose a new --out (an old export is replaced, "
            "nothing else is)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish(tmp: Path, out: Path) -> Path:
    """Move a fully written export into place (an older export of the same name is replaced whole)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    return atomic_replace_dir(tmp, out)


def export_onnx(spec: str | os.PathLike | nn.Module, out: str | os.PathLike, opset: int = OPSET) -> dict[str, Any]:
    """Export a CLIP's towers to ``out`` atomically (a crash or an error leaves nothing half-written).

    Args:
        spec: a checkpoint or training-run directory, a preset name, ``hf:<model>``, or a loaded :class:`CLIP`
            or :class:`~mmfusion.backends.hf.HFEmbedder`.
        out: the export directory (replaced if it is an older export; refused if it is anything else).
        opset: the ONNX opset.

    Returns:
        The export config written as ``export.json``, with ``seconds`` added.
    """
    from ..backends.hf import HFEmbedder

    t0 = time.perf_counter()
    model = spec if isinstance(spec, nn.Module) else load_source(spec)
    out = Path(out)
    tmp = staging_dir(out)
    try:
        if isinstance(model, HFEmbedder):
            from .onnx_hf import write_hf_towers

            cfg = write_hf_towers(model, tmp, opset)
            for name in (IMAGE_FILE, TEXT_FILE):
                check_onnx(tmp / name)
        else:
            write_towers(model, tmp, opset)
            cfg = export_config(model, "fp32", opset)
        atomic_write_json(tmp / EXPORT_FILE, cfg)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**cfg, "seconds": round(time.perf_counter() - t0, 2)}
