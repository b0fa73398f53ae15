"""Two ShapesWorld tasks where the right way to combine image and sound is known.

* **complementary**: one object, drawn at a random grey level (its shape is visible, its colour is not:
  the grey is unrelated to the colour, so no channel average leaks it), and a sound whose pitch says the
  colour (its timbre is drawn at random, so the sound says nothing about the shape). The label is
  "colour shape" (48 classes). The image alone can reach 1/8 (it knows the shape, guesses the colour),
  the sound alone 1/6; only a model that uses both reaches 1.
* **correspondence**: one object in its colour, and a sound of the same colour half of the time, of
  another colour otherwise. The label says whether they match. Each modality alone is at chance (0.5),
  and so is any sum of per-modality scores: "match" is an interaction (an XOR-like function of the two
  colours), which late fusion cannot represent and early or attention fusion can.

Examples are a pure function of ``(seed, split, index)``, generated in memory as tensors: images (N, 3,
S, S) uint8 and log-mel spectrograms (N, n_mels, frames) float32, as a
:class:`~mmfusion.data.features.MultimodalData` with modalities ``image`` and ``audio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..config import field
from .features import MultimodalData
from .shapes import COLOURS, SHAPES, SIZES, polygon
from .sound import SoundConfig, render_object_sound

TASKS = ("complementary", "correspondence")
_SPLITS = {"train": 0, "val": 1, "test": 2}
_STREAM = 7  # random stream of these tasks, apart from every other ShapesWorld stream


@dataclass
class FusionTaskConfig:
    """What the two fusion tasks generate."""

    task: Literal["complementary", "correspondence"] = field("complementary", "which task")
    seed: int = field(0, "the same seed always gives the same examples")
    image_size: int = field(32, "side of the images in pixels")
    sound_seconds: float = field(0.5, "length of each sound")
    snr_db: float = field(10.0, "signal-to-noise ratio of the sounds in dB")
    n_mels: int = field(64, "mel bands of the log-mel spectrogram")


def class_names(task: str) -> list[str]:
    if task == "complementary":
        return [f"{c} {s}" for s in SHAPES for c in COLOURS]  # label = shape * 8 + colour
    if task == "correspondence":
        return ["mismatch", "match"]
    raise ValueError(f"unknown fusion task {task!r}; choose one of {', '.join(TASKS)}")


def _draw(shape: str, size: str, x: float, y: float, fill, background: int, side: int) -> np.ndarray:
    big = side * 2
    img = Image.new("RGB", (big, big), (background,) * 3)
    draw = ImageDraw.Draw(img)
    cx, cy, r = x * big, y * big, SIZES[size] * big * 1.6  # a lone object on a small canvas: drawn larger
    if shape == "circle":
        rr = r * 0.9
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill)
    else:
        draw.polygon(polygon(shape, cx, cy, r), fill=fill)
    return np.asarray(img.reduce(2), dtype=np.uint8)


def make_fusion_data(cfg: FusionTaskConfig, split: str, n: int, progress: bool = False) -> MultimodalData:
    """``n`` examples of ``cfg.task`` from ``split`` (train, val or test)."""
    from .audio import LogMel

    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    names = class_names(cfg.task)
    colours, sizes = list(COLOURS), list(SIZES)
    scfg = SoundConfig(seconds=cfg.sound_seconds, snr_db=cfg.snr_db)
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    waves = np.empty((n, int(round(scfg.sample_rate * scfg.seconds))), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    meta = {k: np.empty(n, dtype=np.int64) for k in ("shape", "colour", "sound_colour")}
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{cfg.task} {split}", unit="ex", leave=False)
    for i in it:
        rng = np.random.default_rng([cfg.seed, _SPLITS[split], i, _STREAM])
        si, ci = int(rng.integers(len(SHAPES))), int(rng.integers(len(colours)))
        size = sizes[int(rng.integers(len(sizes)))]
        x, y = rng.uniform(0.3, 0.7, size=2)
        background = int(rng.integers(0, 60))
        if cfg.task == "complementary":
            grey = int(rng.integers(100, 256))  # unrelated to the colour: only the sound tells it
            images[i] = _draw(SHAPES[si], size, x, y, (grey,) * 3, background, cfg.image_size)
            sound_ci = ci
            labels[i] = si * len(colours) + ci
        else:
            images[i] = _draw(SHAPES[si], size, x, y, COLOURS[colours[ci]], background, cfg.image_size)
            match = rng.random() < 0.5
            sound_ci = ci if match else int((ci + rng.integers(1, len(colours))) % len(colours))
            labels[i] = int(match)
        timbre = SHAPES[int(rng.integers(len(SHAPES)))]  # the sound never tells the image's shape
        waves[i] = render_object_sound(colours[sound_ci], timbre, size, rng, scfg)
        meta["shape"][i], meta["colour"][i], meta["sound_colour"][i] = si, ci, sound_ci
    logmel = LogMel(sample_rate=scfg.sample_rate, n_mels=cfg.n_mels)
    audio = torch.cat([logmel(torch.from_numpy(waves[j : j + 512])) for j in range(0, n, 512)]) if n else None
    image = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    audio = audio if audio is not None else torch.zeros(0, cfg.n_mels, 1)
    return MultimodalData({"image": image, "audio": audio}, torch.from_numpy(labels), names, meta=meta)
