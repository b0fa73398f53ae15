"""One query path: texts and images to L2-normalised vectors, the same way for the CLI, the service and indexing.

A query image is decoded as indexing decodes a file (:func:`decode_plan`), so a photo searched for by example
gets the vector it got when it was indexed; a query text may be averaged over photo prompts (the CLIP paper's
prompt ensemble). On CPU, a batch of texts runs in groups of similar length (:func:`split_by_length`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..data.images import ImageDecodeError, ImageTransform, normalize_batch, resize_center_crop, to_rgb
from ..data.prompts import PHOTO_TEMPLATES
from ..data.tokenizer import PAD_ID
from ..interfaces import Embedder
from .decode import decode_file

TEXT_CALL_MIN_ROWS = 128  # a CPU call of a text tower costs at least as much as this many token positions


def decode_plan(model: Embedder) -> tuple[ImageTransform | None, int | None, bool]:
    """(transform, size, crop) for decoding images for ``model``.

    A model with an :class:`ImageTransform` gets (size, size) crops that the index normalises itself; a model
    with its own processor that says its ``input_size`` gets whole images, JPEGs decoded at reduced scale no
    smaller than that; any other gets whole images at full scale.
    """
    transform = getattr(model, "transform", None)
    if isinstance(transform, ImageTransform):
        return transform, transform.size, True
    size = getattr(model, "input_size", None)
    return None, size if isinstance(size, int) and size > 0 else None, False


def split_by_length(lengths: Sequence[int], min_rows: float = 0) -> list[list[int]]:
    """A batch of sequences split into groups of similar length, so that less of each model call is padding.

    A model that pads each call to its longest sequence does ``len(group) * longest`` rows of work per call, and
    a call costs about ``min_rows`` rows however small it is (on CPU, each call reads all the weights, which
    takes as long as that many rows of arithmetic). The split minimises the sum over groups of
    ``max(len(group) * longest, min_rows)``, exactly, by dynamic programming over the distinct lengths in order;
    of two splits that cost the same, the one with fewer groups wins.

    Args:
        lengths: each sequence's length (tokens, padding excluded).
        min_rows: what the smallest call costs, in rows; 0 gives a group per distinct length, a huge value one
            group.

    Returns:
        Groups of indices into ``lengths``, each in increasing order, the groups from the shortest sequences up.
    """
    if not lengths:
        return []
    distinct = sorted(set(lengths))
    count = {n: 0 for n in distinct}
    for n in lengths:
        count[n] += 1
    # best[j]: the cheapest split of the sequences with the j shortest distinct lengths; cut[j]: its last group
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        n = 0
        for i in range(j, 0, -1):  # the last group holds the distinct lengths i..j (1-based)
            n += count[distinct[i - 1]]
            cost = best[i - 1] + max(n * distinct[j - 1], min_rows)
            if cost <= best[j]:  # ties go to the larger last group: fewer calls
                best[j], cut[j] = cost, i - 1
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append(distinct[j - 1])
        j = cut[j]
    groups: dict[int, list[int]] = {b: [] for b in sorted(bounds)}
    edges = sorted(bounds)
    for index, n in enumerate(lengths):
        groups[edges[bisect.bisect_left(edges, n)]].append(index)
    return list(groups.values())


def _what_to_do(reason: str) -> str:
    if reason.startswith("cannot read"):
        return "check the path (a relative one starts from the current folder) and that the file is readable"
    if "pixels" in reason or "MiB" in reason:
        return "use a smaller copy of the image"
    return "use a JPEG, PNG, WebP, GIF, BMP or TIFF file that opens in an image viewer"


def _inference():
    """torch's inference mode when torch is loaded; nothing for a torch-free embedder (an ONNX export)."""
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


def _numpy(z) -> np.ndarray:
    """A model's output as float32 NumPy: torch tensors (any device, any float type) or arrays."""
    if isinstance(z, np.ndarray):
        return z.astype(np.float32, copy=False)
    return z.float().cpu().numpy()


def _normalised(z: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(z, axis=-1, keepdims=True)
    return (z / np.maximum(norms, 1e-12)).astype(np.float32)


class QueryEncoder:
    """Query texts and images to L2-normalised float32 vectors, the same way for the CLI, the service and indexing.

    Args:
        embedder: the model; images are decoded for it as :func:`decode_plan` says.
    """

    text_call_min_rows = TEXT_CALL_MIN_ROWS

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.embed_dim = int(embedder.embed_dim)
        self.transform, self.size, self.crop = decode_plan(embedder)

    # ---- texts ------------------------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str], ensemble: bool = False) -> np.ndarray:
        """(N, D) normalised text vectors.

        Args:
            texts: the query texts.
            ensemble: average each text over the photo prompts ("a photo of a {}.", ...), then renormalise.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        if not ensemble:
            return _normalised(self._text_vectors(texts))
        prompts = [t.format(text) for text in texts for t in PHOTO_TEMPLATES]
        z = self._text_vectors(prompts).reshape(len(texts), len(PHOTO_TEMPLATES), -1)  # (N, T, D)
        return _normalised(z.mean(1))

    def _text_vectors(self, texts: list[str]) -> np.ndarray:
        """One batch of texts through the model. A native model pads a call to its longest text, and texts in a
        batch differ in length, so on CPU the batch is tokenized at once and run in groups of similar length
        (``split_by_length``): 20-25% fewer rows in the service benchmark's batches. An adapter that tokenizes
        inside (HF pads to a fixed length for some models), or a GPU, where small calls cost as much as large
        ones, gets the batch in one call."""
        model = self.embedder
        tokenize = getattr(model, "tokenize", None)
        device = getattr(model, "device", None)
        with _inference():
            if tokenize is None or len(texts) < 2 or getattr(device, "type", "cpu") != "cpu":
                return _numpy(model.encode_text(texts))
            tokens = tokenize(texts)  # (B, L): <pad> after each text's <eot>
            out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
            for group in split_by_length((tokens != PAD_ID).sum(-1).tolist(), self.text_call_min_rows):
                out[group] = _numpy(model.encode_text(tokens[group]))
            return out

    # ---- images -----------------------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Image.Image | str | os.PathLike]) -> np.ndarray:
        """(N, D) normalised image vectors of PIL images or image files, decoded as indexing decodes a file.

        Raises:
            ImageDecodeError: a file that is not a usable image; the message names it (as given) and what to do.
        """
        if not len(images):
            return np.empty((0, self.embed_dim), dtype=np.float32)
        return _normalised(self.encode_pixels([self._pixels(image) for image in images], self.transform))

    def _pixels(self, image: Image.Image | str | os.PathLike) -> np.ndarray | Image.Image:
        if isinstance(image, Image.Image):
            rgb = to_rgb(image)
            return np.asarray(resize_center_crop(rgb, self.size), dtype=np.uint8) if self.size and self.crop else rgb
        path = os.fspath(image)
        try:
            return decode_file(path, self.size, crop=self.crop).pixels
        except ImageDecodeError as e:  # several images in one query: say which, as the caller named it
            raise ImageDecodeError(f"{path}: {e}; {_what_to_do(str(e))}") from e

    def encode_pixels(self, pixels: list, transform: ImageTransform | None) -> np.ndarray:
        """(N, D) model output for images already decoded by :func:`decode_plan`'s rule: (S, S, 3) uint8 arrays
        that ``transform`` normalises here, or RGB images for a model that preprocesses them itself."""
        with _inference():
            if isinstance(transform, ImageTransform):
                import torch  # a model with mmfusion's ImageTransform takes tensors

                x = normalize_batch(torch.from_numpy(np.stack(pixels)), transform.mean, transform.std)
                z = self.embedder.encode_image(x)
            else:
                z = self.embedder.encode_image(list(pixels))
        return _numpy(z)
