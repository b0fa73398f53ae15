"""Read, hash and decode one photo for a model: what the indexer's workers run, one file at a time.

A file is read once: the bytes are hashed (BLAKE2b, for rename and duplicate detection) and decoded from
memory. Decoding is what real photo folders need: the pixel count is checked from the header before any
pixel is decoded (decompression bombs), JPEGs are decoded at a reduced scale by libjpeg's DCT scaling when
the model needs far fewer pixels (``draft``), EXIF orientation is applied, and every mode (CMYK, 16-bit,
palette with transparency, RGBA, the first frame of an animation) becomes RGB.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image, resize_center_crop, to_rgb

MAX_FILE_BYTES = 512 * 1024 * 1024  # a single photo larger than this is refused unread

_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME = 0x8769, 36867, 306


@dataclass
class Decoded:
    """One file, read and (unless only the hash was wanted) decoded."""

    digest: bytes  # 16-byte BLAKE2b of the file's bytes
    pixels: np.ndarray | Image.Image | None = None  # (S, S, 3) uint8 at the model size, or an RGB image
    width: int = 0  # the stored image's size, after EXIF rotation
    height: int = 0
    format: str = ""
    taken: float | None = None  # EXIF date the photo was taken (unix seconds), when present


def file_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageDecodeError(f"file is over {max_bytes // 2**20} MiB")
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return data


def _taken(img: Image.Image) -> float | None:
    """EXIF DateTimeOriginal (or DateTime) as unix seconds, read as UTC."""
    try:
        exif = img.getexif()
        text = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        if not text:
            return None
        stamp = datetime.strptime(str(text).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
        return stamp.replace(tzinfo=UTC).timestamp()
    except Exception:  # a broken EXIF block never costs the image
        return None


def decode_bytes(
    data: bytes, size: int | None, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = True, crop: bool = True
) -> Decoded:
    """Decode image bytes for a model.

    Args:
        data: the file's bytes.
        size: the model's square input side: the result is a (size, size, 3) uint8 array after a short-side
            resize and centre crop. None: return the whole RGB image (for models that preprocess themselves).
        max_pixels: refuse images with more pixels than this, checked from the header before decoding (this limit,
            not Pillow's own, is the one that counts: see :func:`~mmfusion.data.images.open_image`); None: no limit.
        draft: let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves at least ``size``
            pixels on the short side (several times faster on large photos).
        crop: False: return the whole RGB image (decoded at reduced scale where ``draft`` allows) for a model
            whose own processor resizes it, ``size`` being the smallest side that processor works at.

    Raises:
        ImageDecodeError: not an image, truncated, or too large; the message says which.
    """
    digest = file_digest(data)
    try:
        img = open_image(io.BytesIO(data), max_pixels)  # the header's pixel count, checked before decoding
        w, h = img.size
        fmt = img.format or ""
        taken = _taken(img)
        if draft and size and fmt == "JPEG":
            img.draft("RGB", (size, size))  # DCT scaling: the result is still at least size x size
        img.load()
        rgb = to_rgb(img)  # EXIF orientation, alpha over white, 16-bit, CMYK, palette
        width, height = _oriented_size(img, w, h)
        pixels = np.asarray(resize_center_crop(rgb, size), dtype=np.uint8) if size and crop else rgb
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not an image: unknown format or damaged header") from e
    except OSError as e:
        reason = "truncated file" if "truncated" in str(e).lower() else f"cannot decode: {e}"
        raise ImageDecodeError(reason) from e
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ValueError...)
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e
    return Decoded(digest, pixels, width, height, fmt, taken)


def _oriented_size(img: Image.Image, w: int, h: int) -> tuple[int, int]:
    """Full-resolution size as displayed: EXIF orientations 5-8 swap width and height."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_file(
    path: str,
    size: int | None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    known=None,
    crop: bool = True,
) -> Decoded:
    """Read, hash and decode a file; with ``known(digest) -> bool`` true, skip decoding (a vector exists).

    Raises:
        ImageDecodeError: unreadable or not a usable image; the message says why.
    """
    try:
        data = read_file(path)
    except ImageDecodeError:
        raise
    except OSError as e:
        raise ImageDecodeError(f"cannot read: {e.strerror or e}") from e
    if known is not None:
        digest = file_digest(data)
        if known(digest):
            return Decoded(digest)
    return decode_bytes(data, size, max_pixels, draft, crop)


class DecodeGate:
    """How many decoding threads may run at once, adjustable while they run, and what decoding costs.

    The indexer's pool has a thread per CPU. When the model is the bottleneck (a decode costs less CPU
    than the model spends per image), half of them are enough to stay ahead, and the other half would only
    slow the model's own threads down; when decoding is the bottleneck (a small model), all of them run.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._sem = threading.Semaphore(threads)
        self._held = 0  # permits the main thread holds back
        self._lock = threading.Lock()
        self.cpu_s, self.count = 0.0, 0

    def run(self, fn, *args):
        with self._sem:
            t0 = time.thread_time()
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self.cpu_s += time.thread_time() - t0
                    self.count += 1

    @property
    def active(self) -> int:
        return self.threads - self._held

    def limit(self, k: int) -> None:
        """Let at most ``k`` decodes run at once (called from the main thread)."""
        target = self.threads - max(1, min(k, self.threads))
        while self._held < target:
            self._sem.acquire()
            self._held += 1
        while self._held > target:
            self._sem.release()
            self._held -= 1

    def cpu_per_item(self) -> float | None:
        with self._lock:
            return self.cpu_s / self.count if self.count >= 8 else None
