"""Drawing ShapesWorld scenes: how many objects, which shape-colour combinations, where they sit.

Objects are placed by rejection sampling so that none overlaps another or the frame. Training scenes
never hold a held-out combination; ``heldout`` scenes hold at least one. A curriculum starts training
with single objects and moves to crowded scenes, so shape and colour are learned first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...config import field
from ..scene import DEFAULT_HELDOUT, SIZES, Obj, Scene, all_combos


@dataclass
class ShapesConfig:
    """How ShapesWorld scenes are generated."""

    seed: int = field(0, "seed of the world: the same seed always gives the same scenes")
    image_size: int = field(64, "side of the rendered images in pixels")
    max_objects: int = field(3, "objects per scene are drawn from 1..max_objects")
    object_weights: tuple[float, ...] = field((0.4, 0.35, 0.25), "relative frequency of 1, 2, 3 objects")
    heldout: tuple[str, ...] = field(DEFAULT_HELDOUT, "'colour shape' combinations never seen in training")
    captions_per_scene: int = field(5, "captions written for each scene")
    supersample: int = field(2, "render at this multiple of the size, then downsample (anti-aliasing)")
    curriculum: int = field(
        30000,
        "training split only: the first N scenes hold one object, and over the next N the "
        "mix of object counts moves linearly to object_weights, so shape and colour are "
        "learned before scenes get crowded (a small model learns shape several times faster)",
    )


def _place(rng: np.random.Generator, radii: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Centres for circles of the given radii, inside the frame and not overlapping."""
    pos: list[tuple[float, float]] = []
    gap = 0.04
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + gap) ** 2 for (px, py), pr in zip(pos, radii)):
                pos.append((float(x), float(y)))
                break
        else:
            return None
    return pos


def object_count_weights(cfg: ShapesConfig, split: str, index: int) -> np.ndarray:
    """Relative frequency of 1..max_objects objects for one scene (the curriculum ramps training scenes)."""
    weights = np.asarray(cfg.object_weights[: cfg.max_objects], dtype=float)
    weights = weights / weights.sum()
    if split == "train" and index < 2 * cfg.curriculum:
        a = max(0.0, index / cfg.curriculum - 1.0)  # 0 while holding single objects, then up to 1
        weights = a * weights + (1 - a) * np.eye(len(weights))[0]
    return weights


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig, split: str = "train", index: int = 0) -> Scene:
    """Draw one scene. Training scenes avoid held-out combinations; held-out scenes contain at least one."""
    heldout = list(cfg.heldout)
    seen = [c for c in all_combos() if c not in set(heldout)]
    weights = object_count_weights(cfg, split, index)
    while True:
        n = int(rng.choice(len(weights), p=weights / weights.sum())) + 1
        if split == "heldout":
            combos = [heldout[rng.integers(len(heldout))]]
            combos += [
                seen[rng.integers(len(seen))] if rng.random() < 0.5 else heldout[rng.integers(len(heldout))]
                for _ in range(n - 1)
            ]
            rng.shuffle(combos)
        else:
            combos = [seen[i] for i in rng.integers(len(seen), size=n)]
        sizes = [list(SIZES)[i] for i in rng.integers(len(SIZES), size=n)]
        pos = _place(rng, [SIZES[s] for s in sizes])
        if pos is None:
            continue
        objs = tuple(Obj(c.split()[1], c.split()[0], s, x, y) for c, s, (x, y) in zip(combos, sizes, pos))
        return Scene(objs, int(rng.integers(15, 75)), split, index)


def single_object_scene(rng: np.random.Generator, colour: str, shape: str, split: str, index: int) -> Scene:
    size = list(SIZES)[rng.integers(len(SIZES))]
    ((x, y),) = _place(rng, [SIZES[size]])  # type: ignore[misc]
    return Scene((Obj(shape, colour, size, x, y),), int(rng.integers(15, 75)), split, index)
