"""Shared test helpers: tiny model geometries, tiny run configs, and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfusion.data.shapes import ShapesWorld
from mmfusion.data.tokenizer import Tokenizer
from mmfusion.train.config import DataConfig, RunConfig, TrainConfig

# A CLIP small enough that a training step takes milliseconds.
TINY_MODEL = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 1, "heads": 2},
}
TINY_OVERRIDES = [
    "model.embed_dim=16",
    "model.vision.image_size=16",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.text.vocab_size=512",
    "model.text.context_length=24",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
]


def shapes_tokenizer(context_length: int = 24, vocab_size: int = 512, scenes: int = 300) -> Tokenizer:
    world = ShapesWorld()
    texts = ShapesWorld.vocabulary_texts() + [
        c.text for i in range(scenes) for c in world.captions(world.scene("train", i))
    ]
    return Tokenizer.train(texts, vocab_size, context_length)


def tiny_run(out: Path, **train: object) -> RunConfig:
    """A run of the tiny model on the ShapesWorld stream."""
    t = {
        "steps": 6,
        "batch_size": 8,
        "log_every": 1,
        "save_every": 3,
        "progress": False,
        "warmup_steps": 2,
        "threads": 1,
        **train,
    }
    return RunConfig(
        preset="clip-tiny",
        model=TINY_MODEL,
        data=DataConfig(tokenizer_captions=200),
        train=TrainConfig(**t),
        out=str(out),
    )


def write_png(path: Path, size: tuple[int, int] = (20, 20), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    write_png(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def random_image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def tiny_clip(path: Path, seed: int = 0) -> Path:
    """Save a tiny random CLIP with a ShapesWorld tokenizer as a checkpoint directory."""
    import torch

    from mmfusion.models import create_model, save_model

    torch.manual_seed(seed)
    save_model(create_model("clip-tiny", shapes_tokenizer(scenes=50), **TINY_MODEL), path)
    return path


def photo(path: Path, size: tuple[int, int] = (48, 32), seed: int = 0, fmt: str | None = None, **save) -> Path:
    """A random-colour blocky image (JPEG/PNG/... from the suffix), different for each seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path


def huge_png_header(path: Path, width: int = 40000, height: int = 40000) -> Path:
    """A PNG whose header claims a huge size (a decompression bomb), with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core CPU: one torch thread (oversubscribed OpenMP threads run many times slower).
    A module turns it on by importing it: ``from tests.utils import one_thread``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
