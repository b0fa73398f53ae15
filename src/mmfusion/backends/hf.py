"""Pretrained Hugging Face models behind mmfusion's interfaces (extra: ``pip install 'mmfusion[hf]'``).

One way to name a model everywhere (CLI, Python, service): ``hf:<hub-id>`` (``hf:openai/clip-vit-base-patch32``),
or a local directory written by ``save_pretrained``. A native mmfusion checkpoint directory is told apart
by its config (native configs say ``"family"``, Hugging Face configs say ``"model_type"``).

Offline first: a local directory is read as it is; a hub id is looked up in the Hugging Face cache, and with
``HF_HUB_OFFLINE=1`` nothing goes to the network. A model that is in neither place gives one error naming the
model, where it was looked for and how to get it there.

The families (registered in :data:`mmfusion.models.registry.FAMILIES` with the native ones, so
``mmfusion models`` lists them) and the interface each one provides:

=============  =========================  ============================================
model_type     interface                  adapter
=============  =========================  ============================================
clip, siglip   Embedder                   :class:`HFEmbedder` (this module)
blip           Captioner                  :class:`~mmfusion.backends.hf_caption.HFCaptioner`
qwen2_5_vl     Answerer (VQA)             :class:`~mmfusion.backends.hf_vqa.HFAnswerer`
whisper        Transcriber                :class:`~mmfusion.backends.hf_speech.HFTranscriber`
=============  =========================  ============================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import ImageDecodeError, load_image, to_rgb
from ..models.int8 import quantize_int8
from ..models.registry import pretrained_family, resolve

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"

QUANTIZE_CHOICES = ("int8", "8bit", "4bit")


class ModelNotFoundError(FileNotFoundError):
    """A named pretrained model is neither a local directory nor in the Hugging Face cache."""


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face models need the transformers package: pip install 'mmfusion[hf]'") from e
    return transformers


# ---- naming and finding a model ---------------------------------------------------------------------


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_pretrained`` (not a native mmfusion checkpoint)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "family" not in meta


def hf_source(spec: str | os.PathLike) -> str | None:
    """The hub id or local directory a model name points at, or None when it names no Hugging Face model."""
    text = os.fspath(spec)
    if text.startswith(HF_PREFIX):
        source = text[len(HF_PREFIX) :].strip()
        if not source:
            raise ValueError("hf: needs a model after it, as in hf:openai/clip-vit-base-patch32")
        return str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    return text if is_hf_directory(text) else None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true")


def _not_found(source: str, why: str = "") -> ModelNotFoundError:
    from huggingface_hub import constants

    looked = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    how = (
        f"download it once where there is network (`hf download {source}`, or `huggingface-cli download "
        f"{source}`) and copy the cache here, or save it with save_pretrained() and pass that directory"
    )
    extra = f" ({why})" if why else ""
    if offline():
        extra += "; HF_HUB_OFFLINE=1 forbids downloading it"
    return ModelNotFoundError(
        f"model {source!r} was not found: it is not a local directory and not in {looked}{extra}. To get it: {how}."
    )


def locate(source: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, local_files_only) for a hub id or local directory.

    Raises:
        ModelNotFoundError: a local directory without a config, or a hub id not cached while offline.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json: it is not a Hugging Face model directory (save one with "
                "model.save_pretrained(dir) and processor.save_pretrained(dir))"
            )
        return str(path), True
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"{source} does not exist (a local model directory was expected)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return source, True  # everything needed is read from the cache: no network call
    if offline():
        raise _not_found(source)
    return source, False


def read_config(source: str, local_only: bool) -> dict[str, Any]:
    path = Path(source)
    if path.is_dir():
        return json.loads((path / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source, "config.json", local_files_only=local_only)).read_text())
    except Exception as e:  # no network, no such repo, gated...
        raise _not_found(source, f"{type(e).__name__}: {e}") from e


# ---- device, precision, quantisation -----------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return dev


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def quantization_config(quantize: str | None, device: torch.device, dtype: torch.dtype):
    """bitsandbytes 8-bit/4-bit loading on CUDA; None for no quantisation or for CPU int8 (done after loading)."""
    if quantize in (None, "none", "int8"):
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if device.type != "cuda":
        raise ValueError(f"--quantize {quantize} loads weights with bitsandbytes on a CUDA GPU; on CPU use int8")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def load_hf_model(model_cls, source: str, *, device=None, dtype=None, quantize=None, **kwargs):
    """``model_cls.from_pretrained`` with mmfusion's naming, offline rules, device and precision.

    Returns ``(model, local_files_only, device)``; the model is in eval mode on ``device`` (CPU int8 when
    ``quantize="int8"``; bitsandbytes places 8-bit/4-bit models itself).
    """
    require_transformers()
    where, local_only = locate(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    qc = quantization_config(quantize, dev, dt)
    if quantize == "int8" and dev.type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on CPU; on a GPU use --quantize 8bit or 4bit")
    kw: dict[str, Any] = dict(kwargs, local_files_only=local_only, dtype=dt)
    if qc is not None:
        kw.update(quantization_config=qc, device_map={"": dev.index or 0})
    try:
        model = model_cls.from_pretrained(where, **kw)
    except OSError as e:
        raise _not_found(source, str(e).splitlines()[0]) from e
    if qc is None:
        model = model.to(dev)
    model.eval()
    if quantize == "int8":
        model = quantize_int8(model)
    return model, local_only, dev


def local_dir(source: str) -> Path | None:
    """The directory holding a model's files: the directory itself, or its snapshot in the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        return None


def weights_fingerprint(source: str) -> str:
    """A short hash that identifies a model's weights from its files: each weight file's name, size and
    samples of its bytes (header, 16 spread blocks, tail), so gigabytes are not read. Precision, device and
    quantisation at load time do not change it."""
    import hashlib

    h = hashlib.sha256()
    folder = local_dir(source)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder else []
    if not files:
        h.update(source.encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            block = 1 << 16
            for i in range(18):
                fh.seek(max(0, min(size - block, (size - block) * i // 17)))
                h.update(fh.read(block))
    return h.hexdigest()[:16]


class _NoTorchvisionNotice(logging.Filter):
    """transformers announces, on every load, that it falls back to the PIL image processors when torchvision
    is missing. mmfusion never needs torchvision, so that notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def load_processor(processor_cls, source: str, local_only: bool, **kwargs):
    """``processor_cls.from_pretrained`` with mmfusion's naming and errors."""
    where = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    quiet = _NoTorchvisionNotice()
    hf_log = logging.getLogger("transformers")
    handlers = [h for lg in (hf_log, logging.getLogger()) for h in lg.handlers]
    for h in handlers:
        h.addFilter(quiet)
    try:
        return processor_cls.from_pretrained(where, local_files_only=local_only, **kwargs)
    except OSError as e:
        raise _not_found(source, f"its processor: {str(e).splitlines()[0]}") from e
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def check_family(source: str, model_type: str, architecture: str, interface: str, example: str) -> dict[str, Any]:
    """The config of ``source`` after checking it is ``model_type`` with the ``architecture`` an adapter needs.

    Raises:
        ValueError: another family, or a checkpoint of the family made for another task (a BLIP for VQA is
            also "blip"; loaded as a captioner it would give random output).
    """
    where, local_only = locate(source)
    cfg = read_config(where, local_only)
    mtype = cfg.get("model_type")
    if mtype != model_type:
        raise ValueError(f"{source}: {interface} needs a {model_type} model (model_type {model_type!r}), not {mtype!r}")
    archs = cfg.get("architectures") or []
    if archs and architecture not in archs:
        raise ValueError(
            f"{source} is a {archs[0]} checkpoint; {interface} needs a {architecture} one (e.g. {example})"
        )
    return cfg


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating-point type of a model's weights (float32 for a fully int8-quantised model): what inputs
    are cast to."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Seed PyTorch's generators (CPU, and the model's GPU) for the block and restore them after; None: leave
    them alone. Makes sampling repeatable without changing the caller's random state."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def load_pretrained(spec: str | os.PathLike, *, device=None, dtype=None, quantize: str | None = None, **kwargs):
    """Load the pretrained model a name points at, wrapped in the mmfusion interface of its family.

    Args:
        spec: ``hf:<hub-id>``, ``hf:<directory>`` or a directory written by ``save_pretrained``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: CUDA when present, else CPU.
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"``; default: float32 on CPU, bfloat16 (or float16) on a GPU.
        quantize: ``"int8"`` (dynamic, CPU), ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA).
    """
    source = hf_source(spec)
    if source is None:
        raise ValueError(f"{os.fspath(spec)} does not name a Hugging Face model; write hf:<hub-id> or give a "
                         "directory written by save_pretrained")  # fmt: skip
    require_transformers()
    where, local_only = locate(source)
    cfg = read_config(where, local_only)
    try:
        spec = pretrained_family(cfg.get("model_type"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return resolve(spec.adapter).from_pretrained(source, device=device, dtype=dtype, quantize=quantize, **kwargs)


# ---- images ------------------------------------------------------------------------------------------


def as_pil_images(images) -> list[Image.Image]:
    """PIL images (RGB, EXIF orientation applied) from images, paths, or a list of either."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(to_rgb(im))
        elif isinstance(im, (str, os.PathLike)):
            out.append(load_image(im))
        elif isinstance(im, np.ndarray):
            out.append(to_rgb(Image.fromarray(im)))
        else:
            raise ImageDecodeError(f"expected a PIL image, an image path or an array, got {type(im).__name__}")
    if not out:
        raise ValueError("no images given")
    return out


# ---- Embedder: CLIP and SigLIP ---------------------------------------------------------------------


class HFEmbedder(torch.nn.Module):
    """:class:`~mmfusion.interfaces.Embedder` over ``CLIPModel`` or ``SiglipModel``.

    Images go through the model's own image processor (its resize, crop and normalisation), texts
    through its tokenizer (SigLIP pads to the fixed length it was trained with). Embeddings are the
    projected features, L2-normalised by default. :meth:`logits` scores images against texts the way
    the model was trained: softmax over texts for CLIP, an independent sigmoid per pair for SigLIP.
    """

    def __init__(self, model, processor, name: str, device: torch.device, batch_size: int = 64):
        super().__init__()
        self.model, self.processor, self.name = model, processor, name
        self.model_type = model.config.model_type
        self.device = device
        self.batch_size = batch_size
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self._text_kwargs: dict[str, Any] = {"padding": True, "truncation": True}
        if self.model_type == "siglip":  # trained on text padded to max_length: other padding changes the output
            self._text_kwargs = {"padding": "max_length", "truncation": True,
                                 "max_length": model.config.text_config.max_position_embeddings}  # fmt: skip
        self.input_size = _processor_input_size(self.image_processor)
        self.fingerprint: str | None = None  # set by from_pretrained from the weight files
        self.int8_agreement: dict[str, float] | None = None  # set when quantised to int8

    @classmethod
    def from_pretrained(cls, source: str, *, device=None, dtype=None, quantize=None, batch_size: int = 64):
        transformers = require_transformers()
        where, local_only = locate(source)
        mtype = read_config(where, local_only).get("model_type")
        model_cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}.get(mtype)
        if model_cls is None:
            raise ValueError(f"{source}: an Embedder needs a CLIP or SigLIP model, not {mtype!r}")
        int8 = quantize == "int8"
        model, local_only, dev = load_hf_model(
            model_cls, source, device=device, dtype=dtype, quantize=None if int8 else quantize
        )
        processor = load_processor(transformers.AutoProcessor, source, local_only)
        emb = cls(model, processor, f"hf:{source}", dev, batch_size)
        emb.fingerprint = weights_fingerprint(source)
        if int8:
            if dev.type != "cpu":
                raise ValueError("int8 dynamic quantisation runs on CPU; on a GPU use --quantize 8bit or 4bit")
            emb.quantize_int8()
        return emb

    def quantize_int8(self, probe: int = 8) -> dict[str, float]:
        """Quantise the linear layers to int8 (dynamic, CPU) and measure what it costs.

        The agreement is the cosine of int8 and fp32 embeddings of ``probe`` ShapesWorld scenes and captions
        (min over them), kept in ``self.int8_agreement`` and logged: the model says how close it still is.
        """
        images, texts = _probe(probe)
        ref_i, ref_t = self.encode_image(images), self.encode_text(texts)
        self.model = quantize_int8(self.model)
        got_i, got_t = self.encode_image(images), self.encode_text(texts)
        self.int8_agreement = {
            "image_cosine_min": float((ref_i * got_i).sum(-1).min()),
            "text_cosine_min": float((ref_t * got_t).sum(-1).min()),
        }
        log.info(
            "%s: int8 linear layers; cosine to fp32 embeddings >= %.4f (images), %.4f (texts) on %d probes",
            self.name, self.int8_agreement["image_cosine_min"], self.int8_agreement["text_cosine_min"], probe,
        )  # fmt: skip
        return self.int8_agreement

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return weights_dtype(self.model)

    def preprocess(self, images) -> torch.Tensor:
        """Images (PIL, paths or arrays) -> the model's ``pixel_values`` (B, 3, H, W), float32 on CPU."""
        return self.image_processor(images=as_pil_images(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        """(N, D) image embeddings. ``images``: PIL images, paths, arrays, or preprocessed ``pixel_values``."""
        if isinstance(images, torch.Tensor):
            chunks = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        else:
            imgs = as_pil_images(images)
            chunks = [self.preprocess(imgs[i : i + self.batch_size]) for i in range(0, len(imgs), self.batch_size)]
        out = [self._image_features(c.to(self.device, self.dtype)) for c in chunks]
        z = torch.cat(out).float()
        return F.normalize(z, dim=-1) if normalize else z

    @torch.inference_mode()
    def encode_text(self, texts: str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """(N, D) text embeddings."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, torch.Tensor):
            raise TypeError("HFEmbedder.encode_text takes strings (the model's tokenizer is applied inside)")
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", **self._text_kwargs)
            out.append(self._text_features({k: v.to(self.device) for k, v in tok.items()}))
        z = torch.cat(out).float() if out else torch.zeros(0, self.embed_dim)
        return F.normalize(z, dim=-1) if normalize else z

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    def _text_features(self, tok: dict) -> torch.Tensor:
        keep = ("input_ids", "attention_mask") if self.model_type == "clip" else ("input_ids",)
        return _features(self.model.get_text_features(**{k: tok[k] for k in keep if k in tok}))

    @torch.inference_mode()
    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(N_images, N_texts) scores from normalised embeddings, with the model's learned scale (and bias)."""
        scale = self.model.logit_scale.exp().float().cpu()
        out = image_emb.float().cpu() @ text_emb.float().cpu().T * scale
        if self.model_type == "siglip":
            out = out + self.model.logit_bias.float().cpu()
        return out

    def probabilities(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Per image, how well each text fits: a softmax over the texts for CLIP; for SigLIP an independent
        sigmoid per text (they need not sum to one: several labels, or none, can fit)."""
        lg = self.logits(image_emb, text_emb)
        return torch.sigmoid(lg) if self.model_type == "siglip" else lg.softmax(dim=-1)


def _probe(n: int) -> tuple[list[Image.Image], list[str]]:
    """A few varied images and captions (ShapesWorld, generated; nothing read from disk)."""
    from ..data.shapes import ShapesWorld

    world = ShapesWorld()
    samples = [world.sample("test", i) for i in range(n)]
    return [s.image for s in samples], [s.captions[0].text for s in samples]


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor in older transformers and an output object with the pooled,
    projected features in newer ones."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"unexpected output from the model: {type(out).__name__}")


def _processor_input_size(ip) -> int | None:
    """The side the image processor resizes to (for reduced-scale JPEG decoding), if it says."""
    for attr in ("size", "crop_size"):
        s = getattr(ip, attr, None)
        if s is None:
            continue
        if isinstance(s, int):
            return s
        get = s.get if isinstance(s, dict) else lambda k, _s=s: getattr(_s, k, None)
        vals = [get(k) for k in ("shortest_edge", "height", "width")]
        vals = [v for v in vals if isinstance(v, int) and v > 0]
        if vals:
            return max(vals)
    return None
