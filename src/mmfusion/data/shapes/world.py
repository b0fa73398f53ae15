"""The ShapesWorld: seeded random access to, and streaming of, scenes with their image, captions and questions.

Scenes are a pure function of ``(seed, split, index)``: each draw (scene, captions, questions, sound,
classification sets) has a random stream of its own, so a split can be streamed in memory, read at
random, exported to disk, and resumed mid-stream with nothing but a counter, and adding a modality
changes none of the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..scene import COLOURS, SHAPES, SIZES, Scene, all_combos
from ..sound import SoundConfig, render_sound
from .captions import NUMBER_WORDS, PREFIXES, REGION_PHRASES, RELATION_PHRASES, Caption, make_captions
from .questions import QA, make_questions
from .render import render_image
from .sampling import ShapesConfig, sample_scene, single_object_scene

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "heldout": 3}
SOUND_STREAM = 4  # random stream of scene sounds (0-3: scene, captions, questions, classification sets)


def _check_combos(combos: Sequence[str]) -> None:
    valid = set(all_combos())
    bad = [c for c in combos if c not in valid]
    if bad:
        raise ValueError(
            f"unknown shape-colour combination(s) {bad}; write them as 'colour shape', "
            f"e.g. 'red circle', from colours {list(COLOURS)} and shapes {list(SHAPES)}"
        )


@dataclass(frozen=True)
class Sample:
    """Everything ShapesWorld knows about one scene."""

    scene: Scene
    image: Image.Image
    captions: list[Caption]
    questions: list[QA]


class ShapesWorld:
    """Random access to and streaming of seeded ShapesWorld splits.

    Args:
        cfg: how scenes are generated; the same config always yields the same world.

    Example:
        >>> world = ShapesWorld()
        >>> s = world.sample("train", 0)
        >>> s.captions[0].text
    """

    def __init__(self, cfg: ShapesConfig | None = None):
        self.cfg = cfg or ShapesConfig()
        _check_combos(self.cfg.heldout)
        if len(set(self.cfg.heldout)) >= len(all_combos()):
            raise ValueError("at least one shape-colour combination must stay in training")

    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        """The generator for one scene; ``stream`` separates draws (scene, captions, questions)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; ShapesWorld has {list(SPLITS)}")
        return np.random.default_rng([self.cfg.seed, SPLITS[split], index, stream])

    def scene(self, split: str, index: int) -> Scene:
        return sample_scene(self.rng(split, index), self.cfg, split, index)

    def render(self, scene: Scene, size: int | None = None) -> Image.Image:
        return render_image(scene, size or self.cfg.image_size, self.cfg.supersample)

    def captions(self, scene: Scene) -> list[Caption]:
        return make_captions(scene, self.rng(scene.split, scene.index, 1), self.cfg.captions_per_scene)

    def questions(self, scene: Scene) -> list[QA]:
        return make_questions(scene, self.rng(scene.split, scene.index, 2), self.cfg)

    def sound(self, scene: Scene, cfg: SoundConfig | None = None) -> np.ndarray:
        """The scene's sound (see :mod:`mmfusion.data.sound`): float32 mono samples in [-1, 1].

        Drawn from a random stream of its own, so sound changes no image, caption or question.
        """
        return render_sound(scene, self.rng(scene.split, scene.index, SOUND_STREAM), cfg)

    def sample(self, split: str, index: int) -> Sample:
        scene = self.scene(split, index)
        return Sample(scene, self.render(scene), self.captions(scene), self.questions(scene))

    def stream(self, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """Samples ``start, start+1, ...`` of a split, in memory, without end unless ``stop`` is given."""
        for i in itertools.count(start) if stop is None else range(start, stop):
            yield self.sample(split, i)

    def combos(self, which: str = "all") -> list[str]:
        """'colour shape' class names: all, seen (in training) or heldout."""
        held = set(self.cfg.heldout)
        if which == "all":
            return all_combos()
        if which == "seen":
            return [c for c in all_combos() if c not in held]
        if which == "heldout":
            return [c for c in all_combos() if c in held]
        raise ValueError(f"which must be all, seen or heldout, not {which!r}")

    def classification_set(self, which: str, per_class: int, split: str = "test") -> list[tuple[Scene, str]]:
        """Single-object scenes labelled with their 'colour shape' class, ``per_class`` of each class."""
        out = []
        for ci, combo in enumerate(self.combos(which)):
            colour, shape = combo.split()
            for k in range(per_class):
                index = 1_000_000 + ci * 10_000 + k  # far from the indices of the ordinary scenes
                rng = self.rng(split, index, 3)
                out.append((single_object_scene(rng, colour, shape, split, index), combo))
        return out

    @staticmethod
    def vocabulary_texts() -> list[str]:
        """Texts that cover every word ShapesWorld captions and prompts can use (for tokenizer training)."""
        words = list(SHAPES) + list(COLOURS) + list(SIZES) + list(NUMBER_WORDS.values())
        phrases = [p for ps in list(REGION_PHRASES.values()) + list(RELATION_PHRASES.values()) for p in ps]
        return [" ".join(words), " ".join(phrases), " ".join(PREFIXES)]
