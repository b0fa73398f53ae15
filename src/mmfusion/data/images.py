"""Image decoding and preprocessing with Pillow, NumPy and torch (no torchvision).

Decoding is defensive: the pixel count is checked from the header before any pixels are decoded
(:func:`open_image`, where every image file is opened; its limit, not Pillow's, is the one that counts),
EXIF orientation is applied, and every mode Pillow can open (palette, CMYK, 16-bit, alpha) becomes
plain RGB. Preprocessing is CLIP's: resize the short side, centre crop, scale to [0, 1], normalise.

Augmentation never contradicts a caption: no colour change beyond mild brightness/contrast, and a
horizontal flip only when the caption has no left/right words.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ..config import field

if TYPE_CHECKING:  # torch is imported where tensors are made: decoding alone (a torch-free service) needs none
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
    """A file that could not be read as an image; the message says why."""


_PILLOW_LIMIT_LOCK = threading.Lock()
_CLAIMED = re.compile(r"\((\d+) pixels\)")


def _defer_to_our_limit(max_pixels: int | None) -> None:
    """Make ``max_pixels`` the limit that counts: Pillow's own decompression-bomb limit is raised to at least it
    (never lowered; None when ours is None), and its warning, which only fires above our limit, is silenced.

    Both are process-wide Pillow settings; raising them only ever lets through what our check then decides.
    """
    with _PILLOW_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and (max_pixels is None or max_pixels > current):
            Image.MAX_IMAGE_PIXELS = max_pixels
        if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _over_limit(pixels: str, max_pixels: int) -> str:
    return f"{pixels} pixels is over the limit of {max_pixels:,}"


def open_image(fp, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file or file object without decoding it, refused when its header claims over ``max_pixels``.

    Every image the project decodes is opened here, so one limit, ours, applies everywhere: Pillow's
    ``Image.MAX_IMAGE_PIXELS`` is raised to at least ``max_pixels`` first, and a header so large that Pillow
    still refuses it (over twice its limit) is reported in the same words.

    Args:
        fp: a path or a binary file object.
        max_pixels: the most pixels (width x height, from the header) accepted; None: no limit.

    Raises:
        ImageDecodeError: over the limit. Pillow's own errors for unreadable files pass through.
    """
    _defer_to_our_limit(max_pixels)
    try:
        img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a warning under ``-W error``
        m = _CLAIMED.search(str(e))  # Pillow refuses before saying the size; its message has the pixel count
        claimed = f"{int(m.group(1)):,}" if m else f"more than {max_pixels:,}"
        raise ImageDecodeError(_over_limit(claimed, max_pixels or 0)) from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageDecodeError(_over_limit(f"{w}x{h} = {w * h:,}", max_pixels))
    return img


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB, refusing decompression bombs before decoding.

    Raises:
        ImageDecodeError: unreadable, truncated, not an image, or more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        img = open_image(path, max_pixels)
        img.load()
        return to_rgb(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError as e:
        raise ImageDecodeError("file not found") from e
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ValueError...)
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any Pillow mode, with EXIF orientation applied and transparency over white."""
    try:
        rotated = img.getexif().get(0x0112, 1) not in (None, 1)
    except Exception:  # a damaged EXIF block: show the image as stored
        rotated = False
    if rotated:  # exif_transpose copies the image even when there is nothing to do: ask first
        img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bicubic), then crop the centre square."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def to_uint8(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 array of an RGB image after resize and centre crop."""
    return np.asarray(resize_center_crop(img, size), dtype=np.uint8)


def normalize_batch(
    batch: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), scaled to [0, 1] and normalised per channel."""
    import torch

    x = batch.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(m).div_(s).contiguous()


@dataclass
class ImageTransform:
    """Preprocessing that a model is trained with; saved in its config so loading restores it."""

    size: int = field(64, "side of the square model input in pixels")
    mean: tuple[float, ...] = field(CLIP_MEAN, "per-channel mean subtracted after scaling to [0, 1]")
    std: tuple[float, ...] = field(CLIP_STD, "per-channel standard deviation divided by")

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image(s) -> normalised float tensor (B, 3, size, size)."""
        if isinstance(images, Image.Image):
            images = [images]
        import torch

        arrs = np.stack([to_uint8(to_rgb(im), self.size) for im in images])
        return normalize_batch(torch.from_numpy(arrs), self.mean, self.std)


_LEFT_RIGHT = re.compile(r"\b(left|right|leftmost|rightmost)\b", re.IGNORECASE)


def caption_allows_hflip(caption: str) -> bool:
    """A mirrored image still matches the caption unless the caption speaks of left or right."""
    return _LEFT_RIGHT.search(caption) is None


@dataclass
class AugmentConfig:
    """Train-time augmentation that keeps every caption true."""

    enabled: bool = field(False, "apply augmentation when training")
    hflip: bool = field(True, "mirror half the images whose caption has no left/right words")
    brightness: float = field(0.1, "random brightness factor in [1-b, 1+b]")
    contrast: float = field(0.1, "random contrast factor in [1-c, 1+c]")
    crop_scale: float = field(1.0, "random crop of at least this fraction of the side, resized back (1 = off)")


def augment(arr: np.ndarray, caption: str, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Augment one uint8 (H, W, 3) image for a given caption; deterministic for a given ``rng``."""
    out = arr
    if cfg.crop_scale < 1.0:
        h, w = arr.shape[:2]
        s = rng.uniform(cfg.crop_scale, 1.0)
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(arr[top : top + ch, left : left + cw])
        out = np.asarray(crop.resize((w, h), Image.BICUBIC))
    if cfg.hflip and caption_allows_hflip(caption) and rng.random() < 0.5:
        out = out[:, ::-1]
    if cfg.brightness > 0 or cfg.contrast > 0:
        b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        f = out.astype(np.float32)
        mean = f.mean()
        f = (f - mean) * c + mean * b
        out = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)
