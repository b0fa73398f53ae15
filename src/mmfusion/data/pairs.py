"""Image-caption pairs for contrastive training, addressed by a global sample position.

A pair source maps an index to ``(uint8 image (S, S, 3), caption)``. :class:`PairSampler` turns the
running sample position of training into an index (a fresh permutation each epoch for finite
datasets, the next scene for the endless ShapesWorld stream) and a per-sample random generator.
Everything is a pure function of ``(seed, position)``, so a resumed run sees exactly the batches an
uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .datasets import CaptionFolder
from .images import AugmentConfig, augment, to_uint8
from .shapes import ShapesWorld


class PairSource(Protocol):
    def __len__(self) -> int: ...  # number of images; 0 for an endless stream

    def pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str]: ...

    def caption_corpus(self, limit: int) -> list[str]: ...  # captions to train a tokenizer on


class ShapesPairs:
    """The endless ShapesWorld stream of one split: pair ``i`` is scene ``i`` with one of its captions."""

    def __init__(self, world: ShapesWorld, image_size: int, split: str = "train"):
        self.world, self.image_size, self.split = world, image_size, split

    def __len__(self) -> int:
        return 0

    def pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        scene = self.world.scene(self.split, index)
        captions = self.world.captions(scene)
        img = self.world.render(scene, self.image_size)
        return np.asarray(img, dtype=np.uint8), captions[rng.integers(len(captions))].text

    def caption_corpus(self, limit: int) -> list[str]:
        texts = list(self.world.vocabulary_texts())
        for i in range(limit):
            texts.extend(c.text for c in self.world.captions(self.world.scene(self.split, i)))
        return texts


class FolderPairs:
    """A :class:`CaptionFolder`: pair ``i`` is image ``i`` with one of its captions, drawn per sample."""

    def __init__(self, folder: CaptionFolder, image_size: int):
        if folder.images.shape[1] != image_size:
            folder.images = np.stack([to_uint8_array(a, image_size) for a in folder.images])
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        caps = self.folder.records[index].captions
        return self.folder.images[index], caps[rng.integers(len(caps))]

    def caption_corpus(self, limit: int) -> list[str]:
        return self.folder.captions()[: max(limit, 1) * 5]


def to_uint8_array(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return to_uint8(Image.fromarray(arr), size)


class PairSampler:
    """Which pair, and which random draws, a given sample position gets.

    Args:
        source: the pairs.
        seed: the run's seed; the same seed gives the same order.
        augment: train-time augmentation applied per sample.
    """

    def __init__(self, source: PairSource, seed: int, augment_cfg: AugmentConfig | None = None):
        self.source, self.seed = source, seed
        self.augment = augment_cfg or AugmentConfig()
        self._perm: tuple[int, np.ndarray] | None = None

    def index(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) of a sample position."""
        n = len(self.source)
        if n == 0:
            return 0, position
        epoch, offset = divmod(position, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 7, epoch]).permutation(n))
        return epoch, int(self._perm[1][offset])

    def sample(self, position: int) -> tuple[np.ndarray, str]:
        _, idx = self.index(position)
        rng = np.random.default_rng([self.seed, 11, position])
        img, caption = self.source.pair(idx, rng)
        if self.augment.enabled:
            img = augment(img, caption, self.augment, rng)
        return img, caption

    def batch(self, start: int, size: int) -> tuple[np.ndarray, list[str]]:
        """Samples ``start .. start+size-1`` as a uint8 array (B, S, S, 3) and their captions."""
        items = [self.sample(p) for p in range(start, start + size)]
        return np.stack([im for im, _ in items]), [c for _, c in items]

    def epoch_of(self, position: int) -> float:
        n = len(self.source)
        return position / n if n else 0.0


def unique_ids(texts: Sequence[str]) -> np.ndarray:
    """Small integer ids, equal exactly when the (lower-cased, stripped) texts are equal."""
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(t.strip().lower(), len(table)) for t in texts], dtype=np.int64)
