"""An Embedder on ONNX Runtime: mmfusion's CLIP towers exported to ONNX, run without PyTorch.

An export directory (written by ``mmfusion export onnx``, see :mod:`mmfusion.export`) holds::

    export.json     what it is: image size, mean/std, crop, token ids, embedding width, logit scale, precision
    image.onnx      pixels (B, 3, S, S) float32 -> embeddings (B, D), not normalised
    text.onnx       token ids (B, L) int64 -> embeddings (B, D), not normalised
    tokenizer.json  the model's byte-level BPE (Hugging Face ``tokenizers``)

Everything here is NumPy, Pillow, ``tokenizers`` and ``onnxruntime``: this module never imports torch, so a
service that only embeds can run without it. The preprocessing and the token ids are those of the native model
(:mod:`mmfusion.data.images`' resize and crop, :meth:`mmfusion.data.tokenizer.Tokenizer.encode_ids`, which import
no torch), normalised here in NumPy; the tests check them against the torch path.

In a process that has imported torch anyway (the index, the evaluators, the service), the embedder presents
itself as a native CLIP does: it takes tensors, returns tensors and has an ``ImageTransform``, so those callers
need no special case. Without torch it takes and returns NumPy arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import resize_center_crop, to_rgb  # Pillow and NumPy only: the same pixels as the native path
from ..data.tokenizer import EOT_ID, PAD_ID, SOT_ID, TOKENIZER_FILE, Tokenizer  # noqa: F401 (an export uses these)

EXPORT_FILE, IMAGE_FILE, TEXT_FILE = "export.json", "image.onnx", "text.onnx"
EXPORT_FORMAT = "mmfusion.onnx/1"


class ExportDirError(FileNotFoundError):
    """A path that is not an ONNX export directory; the message says what to run."""


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``mmfusion export onnx`` (or ``mmfusion quantize``)."""
    try:
        return (Path(path) / EXPORT_FILE).is_file()
    except (TypeError, OSError):
        return False


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``export.json`` of an export directory.

    Raises:
        ExportDirError: no such directory, or not an export; the message names the command that makes one.
    """
    path = Path(path)
    if not path.exists():
        raise ExportDirError(
            f"no model at {path}: give a directory written by `mmfusion export onnx --model RUN --out {path}`"
        )
    if not is_export_dir(path):
        raise ExportDirError(
            f"{path} is not an ONNX export (it has no {EXPORT_FILE}); make one with "
            f"`mmfusion export onnx --model {path} --out {path}-onnx`"
        )
    cfg = json.loads((path / EXPORT_FILE).read_text())
    if cfg.get("format") != EXPORT_FORMAT:
        raise ExportDirError(
            f"{path / EXPORT_FILE} has format {cfg.get('format')!r}, this mmfusion reads {EXPORT_FORMAT!r}: "
            "export the model again with this version"
        )
    missing = [f for f in (IMAGE_FILE, TEXT_FILE) if not (path / f).is_file()]
    if missing:
        raise ExportDirError(f"{path} lacks {', '.join(missing)}: export the model again (`mmfusion export onnx`)")
    return cfg


# ---- preprocessing: the same pixels as mmfusion.data.images, without torch ------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """PIL images or uint8 arrays -> the float32 (B, 3, S, S) the image tower takes."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixels(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 of one image, resized and centre-cropped."""
        if isinstance(image, np.ndarray):
            if image.shape == (self.size, self.size, 3) and image.dtype == np.uint8:
                return image
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        return np.asarray(resize_center_crop(to_rgb(image), self.size), dtype=np.uint8)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> float32 (B, 3, S, S), scaled to [0, 1] and normalised per channel."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)  # (B, 3, S, S)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)

    def __call__(self, images: Image.Image | Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        if not len(images):
            return np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return self.normalize(np.stack([self.pixels(im) for im in images]))


# ---- tokenisation: mmfusion.data.tokenizer.Tokenizer's ids as arrays, without torch -----------------------------


class TextTokenizer:
    """Texts to fixed-length int64 id arrays, the native tokenizer's ids (:meth:`Tokenizer.encode_ids`)."""

    def __init__(self, path: str | os.PathLike, context_length: int):
        self.tokenizer = Tokenizer.load(path, context_length)
        self.context_length = int(context_length)

    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """(B, context_length) int64 token ids."""
        return self.tokenizer.encode_ids(texts)

    __call__ = encode


# ---- the embedder ----------------------------------------------------------------------------------------------


def _torch():
    """torch if this process has already imported it (never imported here), else None."""
    return sys.modules.get("torch")


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _l2(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class LogitParams:
    """The trained temperature (and SigLIP bias) that turn cosine similarities into logits."""

    scale: float  # exponentiated and clamped, as the model applied it
    bias: float | None


DEFAULT_THREADS: int | None = None  # set_default_threads: what sessions built without ``threads=`` use


def set_default_threads(threads: int | None) -> None:
    """The intra-op threads of every session built from now on without its own ``threads`` (the service's
    ``threads`` setting; None: ONNX Runtime's own choice, the physical cores)."""
    global DEFAULT_THREADS
    DEFAULT_THREADS = threads


def _session(path: Path, device: str | None, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or DEFAULT_THREADS
    if threads:
        opts.intra_op_num_threads = int(threads)
    # ONNX Runtime's workers spin after each call by default: on a machine shared with torch, decoders or other
    # requests that steals the cores they need (torch at batch 1 beside spinning sessions: 2.6 instead of 354
    # images/s, benchmarks/bench_export.py on a busy 2-core machine)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device and str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"device {device} asked for, but this onnxruntime has no CUDA provider: install onnxruntime-gpu, "
                "or leave out --device to run on the CPU"
            )
        providers.insert(0, "CUDAExecutionProvider")
    elif device not in (None, "cpu", "auto"):
        raise ValueError(f"an ONNX export runs on cpu or cuda, not {device!r}")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OrtEmbedder:
    """An exported CLIP on ONNX Runtime; implements :class:`mmfusion.interfaces.Embedder`.

    Args:
        path: the export directory.
        device: None or ``cpu`` (``cuda`` with onnxruntime-gpu).
        threads: ONNX Runtime's intra-op threads (default: its own choice, the physical cores).
        output: ``auto`` returns torch tensors when the process has torch loaded, NumPy arrays otherwise;
            ``numpy`` always NumPy.
    """

    family = "clip"

    def __init__(self, path: str | os.PathLike, device: str | None = None, threads: int | None = None,
                 output: str = "auto"):  # fmt: skip
        self.path = Path(path)
        self._load_args = {"device": device, "threads": threads, "output": output}
        cfg = read_export_config(self.path)
        self.config = cfg
        self.name = str(self.path)
        self.precision = cfg.get("precision", "fp32")
        self.meta = dict(cfg.get("meta") or {})  # e.g. the ShapesWorld it was trained on, for evaluation
        self.fingerprint = cfg.get("fingerprint") or files_digest(self.path)
        if output not in ("auto", "numpy"):
            raise ValueError(f"output must be 'auto' (torch tensors when torch is loaded) or 'numpy', not {output!r}")
        self.output = output
        self._setup_inputs(cfg["image"], cfg["text"])
        self.logit = LogitParams(float(cfg.get("logit_scale", 100.0)), cfg.get("logit_bias"))
        self._embed_dim = int(cfg["embed_dim"])
        self.image_session = _session(self.path / IMAGE_FILE, device, threads)
        self.text_session = _session(self.path / TEXT_FILE, device, threads)
        self._image_input = self.image_session.get_inputs()[0].name
        self._text_input = self.text_session.get_inputs()[0].name

    def _setup_inputs(self, img: dict[str, Any], txt: dict[str, Any]) -> None:
        """Preprocessing and tokenizer from ``export.json``."""
        self.preprocess = Preprocess(int(img["size"]), tuple(img["mean"]), tuple(img["std"]))
        self.input_size = self.preprocess.size
        self.pixel_shape = (3, self.input_size, self.input_size)
        self.context_length = int(txt["context_length"])
        self.eot_id = int(txt.get("eot_id", EOT_ID))
        self.dynamic_length = bool(txt.get("dynamic_length", False))
        tok = txt.get("tokenizer")
        self.tokenizer = TextTokenizer(self.path / tok, self.context_length) if tok else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.precision}, {self.embed_dim}-d)"

    def __reduce__(self):
        """Pickled as its directory (ONNX Runtime sessions cannot be): another process, a Ray actor for one, opens
        the same export again, so it must see the directory at the same path."""
        a = self._load_args
        return type(self), (str(self.path.resolve()), a["device"], a["threads"], a["output"])

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def transform(self):
        """The native :class:`ImageTransform` when torch is loaded (the index then preprocesses for this model as
        for a native one); None in a torch-free process, where :attr:`input_size` tells callers the size."""
        if _torch() is None:
            return None
        from ..data.images import ImageTransform  # imports torch, which is already loaded

        p = self.preprocess
        return ImageTransform(p.size, p.mean, p.std)

    def _out(self, z: np.ndarray):
        torch = _torch() if self.output == "auto" else None
        return torch.from_numpy(np.ascontiguousarray(z)) if torch is not None else z

    # ---- images ------------------------------------------------------------------------------------------------

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (B, 3, S, S) preprocessed pixels -> (B, D) float32, not normalised."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.pixel_shape:
            raise ValueError(f"expected pixels of shape (B, {', '.join(map(str, self.pixel_shape))}), got {x.shape}")
        if not len(x):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.image_session.run(None, {self._image_input: x})[0].astype(np.float32, copy=False)

    def encode_image(self, images: Any, normalize: bool = True):
        """Embed images: PIL images or uint8 (H, W, 3) arrays, or float pixels (B, 3, S, S) already preprocessed
        (a NumPy array or a torch tensor)."""
        if (isinstance(images, np.ndarray) and images.dtype.kind == "f") or hasattr(images, "detach"):
            x = _as_numpy(images)
        else:
            x = self.preprocess(images)
        z = self.image_features(x)
        return self._out(_l2(z) if normalize else z)

    # ---- texts -------------------------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(B, context_length) int64 token ids."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"model {self.name!r} was exported without a tokenizer (from an untrained preset), so it cannot read "
                "strings: pass token ids, or export a trained run (it keeps tokenizer.json)"
            )
        return self.tokenizer.encode(texts)

    def text_features(self, tokens: np.ndarray) -> np.ndarray:
        """int64 (B, L) token ids -> (B, D) float32, not normalised. Columns after the batch's last ``<eot>`` are
        dropped first (causal attention never looks ahead, so the result is the same, for less work)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"expected token ids of shape (B, L <= {self.context_length}), got {ids.shape}")
        if not len(ids):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        if self.dynamic_length:
            is_eot = ids == self.eot_id
            eot = np.where(is_eot.any(-1), is_eot.argmax(-1), ids.shape[1] - 1)
            ids = ids[:, : int(eot.max()) + 1]
        ids = np.ascontiguousarray(ids)
        return self.text_session.run(None, {self._text_input: ids})[0].astype(np.float32, copy=False)

    def encode_text(self, texts: Any, normalize: bool = True):
        """Embed texts: strings, or token ids (B, L) from this model's tokenizer (NumPy or torch)."""
        if isinstance(texts, str) or (isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts)):
            ids = self.tokenize(texts)
        else:
            ids = _as_numpy(texts)
        z = self.text_features(ids)
        return self._out(_l2(z) if normalize else z)

    # ---- scores ------------------------------------------------------------------------------------------------

    def logits(self, image_embeds: Any, text_embeds: Any):
        """(N_img, N_txt) logits from normalised embeddings, as the model was trained to score them."""
        out = self.logit.scale * (_as_numpy(image_embeds) @ _as_numpy(text_embeds).T)
        return self._out((out + self.logit.bias if self.logit.bias is not None else out).astype(np.float32))

    def probabilities(self, image_embeds: Any, text_embeds: Any):
        """Softmax over the texts (a model trained with InfoNCE) or a sigmoid per pair (with a logit bias)."""
        lg = _as_numpy(self.logits(image_embeds, text_embeds)).astype(np.float64)
        if self.logit.bias is not None:
            p = 1.0 / (1.0 + np.exp(-lg))
        else:
            e = np.exp(lg - lg.max(axis=-1, keepdims=True))
            p = e / e.sum(axis=-1, keepdims=True)
        return self._out(p.astype(np.float32))


def files_digest(path: Path) -> str:
    """A hash of the ONNX files: the identity of an export whose weights differ from its source (int8, fp16)."""
    h = hashlib.sha256()
    for name in (IMAGE_FILE, TEXT_FILE):
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_export(path: str | os.PathLike, device: str | None = None, **kwargs: Any) -> OrtEmbedder:
    """The :class:`OrtEmbedder` of an export directory (``kwargs``: ``threads=``, ``output=``)."""
    other = sorted(set(kwargs) - {"threads", "output"})
    if other:
        raise ValueError(
            f"{', '.join(other)} do not apply to an ONNX export ({path}): its precision is fixed when it is written; "
            "make an int8 or fp16 one with `mmfusion quantize`"
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"{path} is an ONNX export; running it needs onnxruntime: pip install 'mmfusion[onnx]'"
        ) from e
    if read_export_config(path).get("family") == "hf-clip":
        return OrtHFEmbedder(path, device=device, **kwargs)
    return OrtEmbedder(path, device=device, **kwargs)


# ---- Hugging Face CLIP and SigLIP, as their own processors prepare them ---------------------------------------


@dataclass(frozen=True)
class HFPreprocess:
    """Images -> ``pixel_values`` (B, 3, H, W) float32 exactly as transformers' PIL image processors make them:
    resize (the shortest edge, or to a fixed height and width), centre crop, rescale in float64, normalise."""

    size: dict[str, int]
    crop_size: dict[str, int] | None
    resample: int
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def out_hw(self) -> tuple[int, int]:
        c = self.crop_size or self.size
        return int(c.get("height") or c["shortest_edge"]), int(c.get("width") or c["shortest_edge"])

    def _resized(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        if "shortest_edge" in self.size:  # as transformers' get_resize_output_image_size(default_to_square=False)
            s = int(self.size["shortest_edge"])
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            nh, nw = (new_long, s) if w <= h else (s, new_long)
        else:
            nh, nw = int(self.size["height"]), int(self.size["width"])
        return np.asarray(img.resize((nw, nh), resample=self.resample))  # (nh, nw, 3) uint8

    def pixels(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """(3, H, W) float32 of one image."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        arr = self._resized(to_rgb(image))
        if self.crop_size:
            ch, cw = self.out_hw
            h, w = arr.shape[:2]
            if ch > h or cw > w:  # transformers pads a crop larger than the image with zeros
                canvas = np.zeros((max(h, ch), max(w, cw), 3), dtype=arr.dtype)
                top, left = -(-(canvas.shape[0] - h) // 2), -(-(canvas.shape[1] - w) // 2)
                canvas[top : top + h, left : left + w] = arr
                arr, h, w = canvas, *canvas.shape[:2]
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top : top + ch, left : left + cw]
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return x.transpose(2, 0, 1)  # (3, H, W)

    def __call__(self, images: Image.Image | Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        if not len(images):
            return np.zeros((0, 3, *self.out_hw), dtype=np.float32)
        return np.ascontiguousarray(np.stack([self.pixels(im) for im in images]))


class HFTextTokenizer:
    """Texts -> the model's inputs (``input_ids``, and ``attention_mask`` for CLIP) as its fast tokenizer makes
    them, with the same truncation and padding."""

    def __init__(self, path: str | os.PathLike, max_length: int | None, padding: str, pad_id: int, pad_token: str,
                 inputs: Sequence[str]):  # fmt: skip
        from tokenizers import Tokenizer as HFTokenizer

        self.hf = HFTokenizer.from_file(str(path))
        self.hf.no_truncation()
        self.hf.no_padding()
        if max_length:
            self.hf.enable_truncation(int(max_length))
        length = int(max_length) if padding == "max_length" and max_length else None
        self.hf.enable_padding(pad_id=int(pad_id), pad_token=pad_token, length=length)
        self.inputs = tuple(inputs)

    def encode(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in enc], dtype=np.int64).reshape(len(enc), -1)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64).reshape(len(enc), -1)
        return {k: v for k, v in (("input_ids", ids), ("attention_mask", mask)) if k in self.inputs}


class OrtHFEmbedder(OrtEmbedder):
    """A Hugging Face CLIP or SigLIP exported by ``mmfusion export onnx --model hf:...``, on ONNX Runtime: its own
    image processor and tokenizer re-done in NumPy, Pillow and ``tokenizers`` (no torch, no transformers)."""

    family = "hf-clip"
    tokenize = None  # texts go in as strings: the text graph takes the tokenizer's padding and mask as they are
    transform = None  # not mmfusion's preprocessing: callers hand it images (``input_size`` says how small)

    def _setup_inputs(self, img: dict[str, Any], txt: dict[str, Any]) -> None:
        self.model_type = self.config.get("model_type", "clip")
        self.preprocess = HFPreprocess(dict(img["size"]), img.get("crop_size"), int(img["resample"]),
                                       float(img["rescale_factor"]), tuple(img["mean"]), tuple(img["std"]))  # fmt: skip
        self.pixel_shape = (3, *self.preprocess.out_hw)
        self.input_size = int(img.get("input_size") or max(self.preprocess.out_hw))
        self.tokenizer = HFTextTokenizer(self.path / txt["tokenizer"], txt.get("max_length"), txt["padding"],
                                         txt["pad_id"], txt["pad_token"], txt["inputs"])  # fmt: skip
        self.dynamic_length = False

    def text_features(self, feed: dict[str, np.ndarray]) -> np.ndarray:  # type: ignore[override]
        """The tokenizer's arrays -> (B, D) float32, not normalised."""
        if not len(feed["input_ids"]):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.text_session.run(None, feed)[0].astype(np.float32, copy=False)

    def encode_text(self, texts: Any, normalize: bool = True):
        """Embed texts (strings: the model's tokenizer is applied here)."""
        if not (isinstance(texts, str) or all(isinstance(t, str) for t in texts)):
            raise TypeError(f"{type(self).__name__}.encode_text takes strings: the model's tokenizer is applied inside")
        z = self.text_features(self.tokenizer.encode(texts))
        return self._out(_l2(z) if normalize else z)
