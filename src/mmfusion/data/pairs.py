"""Image-caption pairs for contrastive training, addressed by a global sample position.

A pair source maps an index to ``(uint8 image (S, S, 3), caption)``. :class:`PairSampler` turns the
running sample position of training into an index (a fresh permutation each epoch for finite
datasets, the next scene for the endless ShapesWorld stream) and a per-sample random generator.
Everything is a pure function of ``(seed, position)``, so a resumed run sees exactly the batches an
uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .datasets import CaptionFolder, read_jsonl
from .images import AugmentConfig, augment, to_uint8
from .shapes import Scene, ShapesWorld, describes


@dataclass
class Pair:
    image: np.ndarray  # (S, S, 3) uint8
    caption: str
    scene: Scene | None = None  # what the image shows, when the data knows it (ShapesWorld)
    meaning: dict | None = None  # what the caption says, likewise


class PairSource(Protocol):
    def __len__(self) -> int: ...  # number of images; 0 for an endless stream

    def pair(self, index: int, rng: np.random.Generator) -> Pair: ...

    def caption_corpus(self, limit: int) -> list[str]: ...  # captions to train a tokenizer on


class ShapesPairs:
    """The endless ShapesWorld stream of one split: pair ``i`` is scene ``i`` with one of its captions."""

    def __init__(self, world: ShapesWorld, image_size: int, split: str = "train"):
        self.world, self.image_size, self.split = world, image_size, split

    def __len__(self) -> int:
        return 0

    def pair(self, index: int, rng: np.random.Generator) -> Pair:
        scene = self.world.scene(self.split, index)
        captions = self.world.captions(scene)
        cap = captions[rng.integers(len(captions))]
        return Pair(np.asarray(self.world.render(scene, self.image_size), dtype=np.uint8), cap.text, scene, cap.meaning)

    def caption_corpus(self, limit: int) -> list[str]:
        texts = list(self.world.vocabulary_texts())
        for i in range(limit):
            texts.extend(c.text for c in self.world.captions(self.world.scene(self.split, i)))
        return texts


class FolderPairs:
    """A :class:`CaptionFolder`: pair ``i`` is image ``i`` with one of its captions, drawn per sample.

    When the folder has ``scenes.jsonl`` and captions with a ``meaning`` (a ShapesWorld export), pairs
    carry them too, so training on the export sees exactly what training on the stream sees.
    """

    def __init__(self, folder: CaptionFolder, image_size: int):
        if folder.images.shape[1] != image_size:
            folder.images = np.stack([to_uint8_array(a, image_size) for a in folder.images])
        self.folder = folder
        self.scenes: list[Scene] | None = None
        path = folder.root / "scenes.jsonl"
        if path.is_file():
            by_image = {obj["image"]: Scene.from_dict(obj) for _, obj in read_jsonl(path)}
            if all(r.image in by_image for r in folder.records):
                self.scenes = [by_image[r.image] for r in folder.records]
        self.world = _world_config(folder.root)

    @property
    def ordered_stream(self) -> bool:
        """A ShapesWorld training export whose order matters (a curriculum): the prefix of the stream."""
        return self.scenes is not None and (self.world or {}).get("curriculum", 0) > 0

    def __len__(self) -> int:
        return len(self.folder)

    def pair(self, index: int, rng: np.random.Generator) -> Pair:
        rec = self.folder.records[index]
        k = int(rng.integers(len(rec.captions)))
        scene = self.scenes[index] if self.scenes is not None else None
        return Pair(self.folder.images[index], rec.captions[k], scene, rec.extras[k].get("meaning"))

    def caption_corpus(self, limit: int) -> list[str]:
        texts = list(ShapesWorld.vocabulary_texts()) if self.world is not None else []
        return texts + [c for r in self.folder.records[: max(limit, 1)] for c in r.captions]


def _world_config(root) -> dict | None:
    """The ShapesConfig of the export a split folder belongs to (``../world.json``), if any."""
    import json

    path = root.parent / "world.json"
    try:
        return json.loads(path.read_text())["config"] if path.is_file() else None
    except (OSError, ValueError, KeyError):
        return None


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

    def __init__(self, source: PairSource, seed: int, augment_cfg: AugmentConfig | None = None,
                 first_epoch_in_order: bool = False):
        self.source, self.seed, self.first_epoch_in_order = source, seed, first_epoch_in_order
        self.augment = augment_cfg or AugmentConfig()
        self._perm: tuple[int, np.ndarray] | None = None

    def index(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) of a sample position."""
        n = len(self.source)
        if n == 0:
            return 0, position
        epoch, offset = divmod(position, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, self._permutation(n, epoch))
        return epoch, int(self._perm[1][offset])

    def _permutation(self, n: int, epoch: int) -> np.ndarray:
        if epoch == 0 and self.first_epoch_in_order:
            return np.arange(n)
        return np.random.default_rng([self.seed, 7, epoch]).permutation(n)

    def sample(self, position: int) -> Pair:
        _, idx = self.index(position)
        rng = np.random.default_rng([self.seed, 11, position])
        pair = self.source.pair(idx, rng)
        if self.augment.enabled:
            pair.image = augment(pair.image, pair.caption, self.augment, rng)
        return pair

    def batch(self, start: int, size: int) -> list[Pair]:
        """Samples ``start .. start+size-1``."""
        return [self.sample(p) for p in range(start, start + size)]

    def epoch_of(self, position: int) -> float:
        n = len(self.source)
        return position / n if n else 0.0


def matches(pairs: Sequence[Pair], mode: str) -> np.ndarray | None:
    """(B, B) bool: which images (rows) match which captions (columns) in a batch.

    Args:
        mode: ``pair`` (only the diagonal), ``caption`` (also any image whose own caption is the same
            text), or ``meaning`` (also any image the caption describes, when the data says what images
            show and captions mean; otherwise as ``caption``).
    """
    if mode == "pair":
        return None
    if mode == "meaning" and all(p.scene is not None and p.meaning is not None for p in pairs):
        return np.array([[describes(pi.scene, pj.meaning) for pj in pairs] for pi in pairs]) | \
            np.eye(len(pairs), dtype=bool)
    if mode not in ("caption", "meaning"):
        raise ValueError(f"unknown positives mode {mode!r}; choose pair, caption or meaning")
    ids = unique_ids([p.caption for p in pairs])
    return ids[:, None] == ids[None, :]


def unique_ids(texts: Sequence[str]) -> np.ndarray:
    """Small integer ids, equal exactly when the (lower-cased, stripped) texts are equal."""
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(t.strip().lower(), len(table)) for t in texts], dtype=np.int64)
