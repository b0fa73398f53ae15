"""Image-caption pairs for contrastive training, addressed by a global sample position.

A pair source maps an index to ``(uint8 image (S, S, 3), caption)``. :class:`PairSampler` turns the
running sample position of training into an index (a fresh permutation each epoch for finite
datasets, the next scene for the endless ShapesWorld stream) and a per-sample random generator.
Everything is a pure function of ``(seed, position)``, so a resumed run sees exactly the batches an
uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .datasets import CaptionFolder, read_jsonl
from .images import AugmentConfig, augment, to_uint8
from .negatives import hard_negative, text_negatives
from .shapes import DEFAULT_HELDOUT, Caption, Scene, ShapesWorld, describes_matrix


@dataclass
class Pair:
    """An image with one or more of its captions."""

    image: np.ndarray  # (S, S, 3) uint8
    captions: list[str]
    scene: Scene | None = None  # what the image shows, when the data knows it (ShapesWorld)
    meanings: list[dict | None] | None = None  # what each caption says, likewise
    negatives: list[str] = field(default_factory=list)  # captions edited to be false of the image
    negative_meanings: list[dict] = field(default_factory=list)
    negative_sources: list[Caption] = field(default_factory=list)  # the caption each negative was edited from
    all_captions: list[Caption] | None = None  # every caption the data has for the image (hard negatives edit them)

    @property
    def caption(self) -> str:
        return self.captions[0]

    @property
    def texts(self) -> list[str]:
        """The captions, then the negatives: the order of this image's columns in a batch."""
        return self.captions + self.negatives


def _draw(n: int, k: int, rng: np.random.Generator, first: bool = False) -> list[int]:
    """k indices into n captions: distinct while there are enough, then repeating; ``first`` starts with
    caption 0 (in ShapesWorld the one that names every object)."""
    order = list(rng.permutation(n))
    if first:
        order.remove(0)
        order.insert(0, 0)
    return [int(order[i % n]) for i in range(k)]


class PairSource(Protocol):
    def __len__(self) -> int: ...  # number of images; 0 for an endless stream

    def pair(self, index: int, rng: np.random.Generator, k: int = 1, first: bool = False) -> Pair: ...

    def caption_corpus(self, limit: int) -> list[str]: ...  # captions to train a tokenizer on


class ShapesPairs:
    """The endless ShapesWorld stream of one split: pair ``i`` is scene ``i`` with one of its captions."""

    def __init__(self, world: ShapesWorld, image_size: int, split: str = "train"):
        self.world, self.image_size, self.split = world, image_size, split
        self.heldout = tuple(world.cfg.heldout)

    def __len__(self) -> int:
        return 0

    def pair(self, index: int, rng: np.random.Generator, k: int = 1, first: bool = False) -> Pair:
        scene = self.world.scene(self.split, index)
        caps = self.world.captions(scene)
        chosen = [caps[i] for i in _draw(len(caps), k, rng, first)]
        return Pair(
            np.asarray(self.world.render(scene, self.image_size), dtype=np.uint8),
            [c.text for c in chosen],
            scene,
            [c.meaning for c in chosen],
            all_captions=list(caps),
        )

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
        self.heldout = tuple((self.world or {}).get("heldout", DEFAULT_HELDOUT))

    @property
    def ordered_stream(self) -> bool:
        """A ShapesWorld training export whose order matters (a curriculum): the prefix of the stream."""
        return self.scenes is not None and (self.world or {}).get("curriculum", 0) > 0

    def __len__(self) -> int:
        return len(self.folder)

    def pair(self, index: int, rng: np.random.Generator, k: int = 1, first: bool = False) -> Pair:
        rec = self.folder.records[index]
        chosen = _draw(len(rec.captions), k, rng, first)
        scene = self.scenes[index] if self.scenes is not None else None
        return Pair(
            self.folder.images[index],
            [rec.captions[i] for i in chosen],
            scene,
            [rec.extras[i].get("meaning") for i in chosen],
            all_captions=[Caption(t, e.get("meaning")) for t, e in zip(rec.captions, rec.extras, strict=True)],
        )

    def caption_corpus(self, limit: int) -> list[str]:
        texts = list(ShapesWorld.vocabulary_texts()) if self.world is not None else []
        return texts + [c for r in self.folder.records[: max(limit, 1)] for c in r.captions]


def _world_config(root) -> dict | None:
    """The ShapesConfig of the export a split folder belongs to (``../world.json``), if any."""
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
        augment_cfg: train-time augmentation applied per sample.
        first_epoch_in_order: read a finite source in order in its first epoch (a curriculum export).
        captions_per_image: how many captions each image brings.
        hard_negatives: how many false captions each image brings (data with known meanings only).
        first_caption: each image's first caption comes first (a captioner learning complete descriptions).
    """

    def __init__(
        self,
        source: PairSource,
        seed: int,
        augment_cfg: AugmentConfig | None = None,
        first_epoch_in_order: bool = False,
        captions_per_image: int = 1,
        hard_negatives: int = 0,
        first_caption: bool = False,
    ):
        self.source, self.seed, self.first_epoch_in_order = source, seed, first_epoch_in_order
        self.first_caption = first_caption
        self.k, self.n_negatives = captions_per_image, hard_negatives
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
        pair = self.source.pair(idx, rng, self.k, first=self.first_caption)
        if self.n_negatives:
            self._add_negatives(pair, rng)
        if self.augment.enabled:
            pair.image = augment(pair.image, " ".join(pair.captions), self.augment, rng)
        return pair

    def _add_negatives(self, pair: Pair, rng: np.random.Generator) -> None:
        """Hard negative captions (NegCLIP): for data that knows its scenes (ShapesWorld), one of the image's
        captions edited by a random kind of :mod:`~mmfusion.data.negatives` so that it is false of the scene; for
        free text (a folder), a word swap of a caption (colours, shapes, a relation's order, a count), unchecked.
        A slot that no edit can fill holds a true caption, which the positives mask then counts as a match."""
        known = pair.scene is not None and bool(pair.meanings) and None not in pair.meanings
        heldout = set(getattr(self.source, "heldout", DEFAULT_HELDOUT))
        captions = [Caption(t, m) for t, m in zip(pair.captions, pair.meanings or [None] * len(pair.captions))]
        # edits of any of the image's captions: the multi-object ones give the swaps even when the pair drew a
        # single-object caption (any edit is false of the image, whichever caption it came from)
        editable = [c for c in pair.all_captions or captions if c.meaning is not None] if known else captions
        for _ in range(self.n_negatives):
            j = int(rng.integers(len(captions)))
            source = captions[j]
            if known:
                got = hard_negative(pair.scene, editable or captions, rng, avoid=heldout)
                if got:
                    source, text, meaning = got[0], got[1].text, got[1].meaning
                else:
                    text, meaning = source.text, source.meaning
            else:
                options = text_negatives(source.text)
                pick = options[int(rng.integers(len(options)))] if options else None
                text, meaning = (pick.text, None) if pick else (source.text, None)
            pair.negatives.append(text)
            pair.negative_meanings.append(meaning)
            pair.negative_sources.append(source)

    def batch(self, start: int, size: int) -> list[Pair]:
        """Samples ``start .. start+size-1``."""
        return [self.sample(p) for p in range(start, start + size)]

    def epoch_of(self, position: int) -> float:
        n = len(self.source)
        return position / n if n else 0.0


def matches(pairs: Sequence[Pair], mode: str) -> np.ndarray | None:
    """(B, T) bool: which images (rows) match which captions (columns, all captions of all pairs in order).

    Args:
        mode: ``pair`` (each image matches its own captions), ``caption`` (also any other image with a
            caption of the same text), or ``meaning`` (also any image a caption describes, when the data
            says what images show and captions mean; otherwise as ``caption``).

    Returns:
        The mask, or None when it would be the identity (one caption per image, ``pair``).
    """
    if mode not in ("pair", "caption", "meaning"):
        raise ValueError(f"unknown positives mode {mode!r}; choose pair, caption or meaning")
    owner = np.repeat(np.arange(len(pairs)), [len(p.texts) for p in pairs])  # (T,) image each text came with
    true = np.concatenate([[True] * len(p.captions) + [False] * len(p.negatives) for p in pairs])  # (T,)
    own = (owner[None, :] == np.arange(len(pairs))[:, None]) & true[None, :]  # (B, T)
    if mode == "pair":
        return None if len(owner) == len(pairs) else own
    if mode == "meaning" and all(p.scene is not None and p.meanings and None not in p.meanings for p in pairs):
        meanings = [m for p in pairs for m in p.meanings + p.negative_meanings]
        return describes_matrix([p.scene for p in pairs], meanings) | own
    ids = unique_ids([t for p in pairs for t in p.texts])  # (T,)
    image_has = np.zeros((len(pairs), int(ids.max()) + 1), dtype=bool)
    image_has[owner[true], ids[true]] = True  # a text matches every image that has it as a true caption
    return image_has[:, ids]


def unique_ids(texts: Sequence[str]) -> np.ndarray:
    """Small integer ids, equal exactly when the (lower-cased, stripped) texts are equal."""
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(t.strip().lower(), len(table)) for t in texts], dtype=np.int64)
