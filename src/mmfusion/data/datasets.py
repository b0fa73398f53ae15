"""Datasets on disk, shared by user data and the ShapesWorld export.

Formats (see ARCHITECTURE.md):

- captions: ``images/`` + ``captions.jsonl`` with ``{"image": "images/0001.png", "caption": "..."}`` per
  line; several lines may name the same image. Extra keys are kept (ShapesWorld adds ``meaning``).
- classes: ``root/<class>/<file>``; the folder name is the label (underscores read as spaces).
- VQA: ``qa.jsonl`` with ``{"image": ..., "question": ..., "answer": ...}`` and an optional ``type``.

Images are decoded once, in parallel, to uint8 arrays at the model's input size. Files that cannot be
decoded are skipped, counted, and named in the log; a malformed JSONL line is an error that names the
file and the line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, load_image, to_uint8

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A dataset file that does not follow mmfusion's format; the message names file and line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _require(obj: dict, key: str, path: Path, lineno: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{path}:{lineno}: needs a non-empty string {key!r}, found {value!r}")
    return value


@dataclass
class DecodeReport:
    """What happened to the image files of a dataset."""

    decoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def log(self, what: str) -> None:
        if self.skipped:
            names = "; ".join(f"{p} ({why})" for p, why in self.skipped[:20])
            more = f" and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
            log.warning("%s: skipped %d unreadable image(s): %s%s", what, len(self.skipped), names, more)


def decode_images(
    paths: Sequence[Path],
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    desc: str = "decoding images",
    progress: bool = True,
) -> tuple[np.ndarray, list[int], DecodeReport]:
    """Decode files to a (N_ok, size, size, 3) uint8 array, in parallel threads (Pillow releases the GIL).

    Returns:
        The array, the indices into ``paths`` that decoded, and a report naming the files skipped.
    """

    def one(p: Path) -> np.ndarray | str:
        try:
            return to_uint8(load_image(p, max_pixels), size)
        except ImageDecodeError as e:
            return str(e)

    workers = workers or min(8, os.cpu_count() or 1)
    report = DecodeReport()
    arrays, ok = [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(one, paths)
        quiet = not progress or len(paths) < 500
        for i, res in enumerate(tqdm(results, total=len(paths), desc=desc, unit="img", leave=False, disable=quiet)):
            if isinstance(res, str):
                report.skipped.append((str(paths[i]), res))
            else:
                arrays.append(res)
                ok.append(i)
    report.decoded = len(ok)
    out = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return out, ok, report


@dataclass
class CaptionRecord:
    """One image and every caption given for it."""

    image: str  # path relative to the dataset root
    captions: list[str]
    extras: list[dict]  # per caption, the other keys of its line (e.g. ShapesWorld's "meaning")


def read_captions(root: str | Path, file: str = "captions.jsonl") -> list[CaptionRecord]:
    """Group the lines of ``captions.jsonl`` by image, in order of first appearance."""
    root = Path(root)
    path = root / file
    by_image: dict[str, CaptionRecord] = {}
    for lineno, obj in read_jsonl(path):
        image = _require(obj, "image", path, lineno)
        caption = _require(obj, "caption", path, lineno)
        rec = by_image.setdefault(image, CaptionRecord(image, [], []))
        rec.captions.append(caption)
        rec.extras.append({k: v for k, v in obj.items() if k not in ("image", "caption")})
    if not by_image:
        raise DataFormatError(f"{path} has no captions")
    return list(by_image.values())


class CaptionFolder:
    """An ``images/`` + ``captions.jsonl`` dataset decoded into memory at the model's input size.

    Args:
        root: the folder holding ``captions.jsonl``.
        image_size: side of the decoded square images.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
        progress: bool = True,
    ):
        self.root = Path(root)
        records = read_captions(self.root)
        paths = [self.root / r.image for r in records]
        self.images, ok, self.report = decode_images(
            paths, image_size, max_pixels, workers, desc=f"decoding {self.root.name}", progress=progress
        )
        self.report.log(str(self.root))
        self.records = [records[i] for i in ok]
        if not self.records:
            raise DataFormatError(f"{self.root}: none of the {len(records)} images could be read")

    def __len__(self) -> int:
        return len(self.records)

    def captions(self) -> list[str]:
        return [c for r in self.records for c in r.captions]


@dataclass
class ClassFolder:
    """A ``root/<class>/<file>`` dataset for classification, decoded to uint8 arrays."""

    root: Path
    classes: list[str]  # label names (folder names, underscores as spaces)
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64 into classes
    files: list[str]
    report: DecodeReport

    @classmethod
    def load(cls, root: str | Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ClassFolder:
        root = Path(root)
        if not root.is_dir():
            raise DataFormatError(f"{root} is not a folder; class folders look like root/<class>/<image>")
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files, labels = [], []
        for k, d in enumerate(dirs):
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(p)
                    labels.append(k)
        if not files:
            raise DataFormatError(f"{root} has no images in class sub-folders (root/<class>/<image>)")
        images, ok, report = decode_images(files, image_size, max_pixels, desc=f"decoding {root.name}")
        report.log(str(root))
        return cls(
            root,
            [d.name.replace("_", " ") for d in dirs],
            images,
            np.asarray([labels[i] for i in ok], dtype=np.int64),
            [str(files[i]) for i in ok],
            report,
        )


@dataclass
class QARecord:
    image: str
    question: str
    answer: str
    type: str | None = None


def read_qa(path: str | Path) -> list[QARecord]:
    """Questions and answers from ``qa.jsonl``."""
    path = Path(path)
    out = []
    for lineno, obj in read_jsonl(path):
        answer = obj.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        obj = {**obj, "answer": answer}
        out.append(
            QARecord(
                _require(obj, "image", path, lineno),
                _require(obj, "question", path, lineno),
                _require(obj, "answer", path, lineno),
                obj.get("type"),
            )
        )
    return out
