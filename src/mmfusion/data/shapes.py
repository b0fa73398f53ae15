"""ShapesWorld: a seeded, generated multimodal world where the right answer is always known.

Each scene holds one to three coloured shapes on a plain background. From one :class:`Scene` we render
an image (Pillow, anti-aliased by supersampling), write several natural captions whose meaning is kept
in structured form (so a retrieved image can be checked against a caption), and ask VQA questions.
The scene is the single source of truth: later modalities (sound, video) render from the same scene.

Scenes are a pure function of ``(seed, split, index)``, so a split can be streamed in memory, read at
random, exported to disk, and resumed mid-stream with nothing but a counter.

A compositional split holds some shape-colour combinations out of training entirely (no object in a
training scene has them); the ``heldout`` split is made of scenes that each contain at least one.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ..config import field

if TYPE_CHECKING:
    from .sound import SoundConfig

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (235, 225, 45),
    "green": (45, 180, 65),
    "cyan": (40, 210, 225),
    "blue": (45, 80, 230),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
# Radius of the circumscribed circle, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.10, "large": 0.17}
# One held-out shape per colour, covering every shape: 8 of the 48 combinations.
DEFAULT_HELDOUT: tuple[str, ...] = (
    "red triangle",
    "orange star",
    "yellow cross",
    "green circle",
    "cyan square",
    "blue diamond",
    "purple circle",
    "white triangle",
)
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "heldout": 3}
SOUND_STREAM = 4  # random stream of scene sounds (0-3: scene, captions, questions, classification sets)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SPATIAL_WORDS = ("left", "right")  # words a horizontal flip would contradict
# How often a caption names an object by shape alone ("a circle") or colour alone ("a red object").
# Off by default: such captions fit many images, so they cap retrieval, and in training they let a
# model match on colour alone; with them at 10% and 8%, a tiny CLIP learned shape about 3x slower.
P_SHAPE_ONLY, P_COLOUR_ONLY = 0.0, 0.0
P_SIZE = 0.35  # a caption names an object's size
P_REGION, P_SINGLE = 0.30, 0.12  # single-object captions: "... on the left", "a single ..."
P_RELATION, P_LIST = 0.45, 0.35  # multi-object captions: a relation, a list of all objects, else a count
RELATION_MARGIN = 0.15  # centres must differ by this much (fraction of the side) for a caption to state a relation


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


@dataclass(frozen=True)
class Obj:
    """One object of a scene. Positions are the centre, as fractions of the image side (y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int  # grey level of the background, 0-255
    split: str = "train"
    index: int = 0

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "index": self.index,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = tuple(Obj(o["shape"], o["colour"], o["size"], float(o["x"]), float(o["y"])) for o in d["objects"])
        return cls(objs, int(d.get("background", 40)), d.get("split", "train"), int(d.get("index", 0)))


@dataclass(frozen=True)
class Caption:
    """A caption and its meaning: ``{"objects": [...], "relations": [[i, rel, j]], "count": n | None}``.

    Each object reference may leave attributes out (``None``); a scene satisfies the caption when the
    references map to distinct objects of the scene with those attributes and the relations hold.
    """

    text: str
    meaning: dict


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str  # colour, shape, count, exist, relation, size


# ---------------------------------------------------------------------------------------------------
# Sampling


def all_combos() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _check_combos(combos: Sequence[str]) -> None:
    valid = set(all_combos())
    bad = [c for c in combos if c not in valid]
    if bad:
        raise ValueError(
            f"unknown shape-colour combination(s) {bad}; write them as 'colour shape', "
            f"e.g. 'red circle', from colours {list(COLOURS)} and shapes {list(SHAPES)}"
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


# ---------------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r / np.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + r * np.sin(a) + r * 0.15) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.deg2rad(-90 + 36 * k)
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    if shape == "cross":
        a, b = r * 0.32, r * 0.95
        return [
            (cx - a, cy - b),
            (cx + a, cy - b),
            (cx + a, cy - a),
            (cx + b, cy - a),
            (cx + b, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + b),
            (cx - a, cy + b),
            (cx - a, cy + a),
            (cx - b, cy + a),
            (cx - b, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}; ShapesWorld draws {list(SHAPES)}")


def render_image(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    big = size * supersample
    img = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.radius * big
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            rr = r * 0.9  # a circle fills its bounding circle; shrink so areas stay comparable
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=colour)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=colour)
    if supersample > 1:
        img = img.reduce(supersample)
    return img


# ---------------------------------------------------------------------------------------------------
# Captions: text plus a meaning that can be checked against any scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _region(o: Obj) -> str | None:
    """The region of the frame an object is clearly in, if any."""
    if 0.38 < o.x < 0.62 and 0.38 < o.y < 0.62:
        return "middle"
    horiz = "left" if o.x < 0.35 else "right" if o.x > 0.65 else None
    vert = "top" if o.y < 0.35 else "bottom" if o.y > 0.65 else None
    if horiz and vert:
        return f"{vert} {horiz}"
    return horiz or vert


REGION_PHRASES = {
    "left": ["on the left", "at the left", "on the left side"],
    "right": ["on the right", "at the right", "on the right side"],
    "top": ["at the top", "near the top", "in the upper part"],
    "bottom": ["at the bottom", "near the bottom", "in the lower part"],
    "middle": ["in the middle", "in the centre", "in the center"],
    "top left": ["in the top left corner", "at the top left"],
    "top right": ["in the top right corner", "at the top right"],
    "bottom left": ["in the bottom left corner", "at the bottom left"],
    "bottom right": ["in the bottom right corner", "at the bottom right"],
}
RELATION_PHRASES = {
    "left_of": ["to the left of", "left of", "on the left of"],
    "right_of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
}
PREFIXES = ["", "", "", "a picture of ", "an image of ", "a drawing of ", "there is ", "a scene with ", "a photo of "]


def _ref(o: Obj, rng: np.random.Generator, full: bool = False) -> dict:
    """Which attributes a caption mentions for this object (mostly colour and shape, sometimes fewer)."""
    r = 1.0 if full else rng.random()
    ref = {"shape": o.shape, "colour": o.colour, "size": o.size if rng.random() < P_SIZE else None}
    if r < P_SHAPE_ONLY:
        ref["colour"] = None
    elif r < P_SHAPE_ONLY + P_COLOUR_ONLY:
        ref["shape"] = None
    return ref


def _np(ref: dict, article: str = "a") -> str:
    words = [w for w in (ref.get("size"), ref.get("colour")) if w]
    noun = ref.get("shape") or ("object" if len(words) == 0 else ["shape", "object"][len(words) % 2])
    words.append(noun)
    if article == "a":
        article = _article(words[0])
    return f"{article} {' '.join(words)}" if article else " ".join(words)


def _relation(a: Obj, b: Obj) -> list[str]:
    rels = []
    if a.x < b.x - RELATION_MARGIN:
        rels.append("left_of")
    if a.x > b.x + RELATION_MARGIN:
        rels.append("right_of")
    if a.y < b.y - RELATION_MARGIN:
        rels.append("above")
    if a.y > b.y + RELATION_MARGIN:
        rels.append("below")
    return rels


def _caption_single(o: Obj, rng: np.random.Generator) -> Caption:
    ref = _ref(o, rng)
    kind = rng.random()
    if kind < P_REGION and _region(o):
        region = _region(o)
        ref["region"] = region
        phrases = REGION_PHRASES[region]
        text = f"{_np(ref)} {phrases[rng.integers(len(phrases))]}"
        return Caption(text, {"objects": [ref], "relations": [], "count": None})
    if kind < P_REGION + P_SINGLE:
        text = ["a single ", "just one ", "only one "][rng.integers(3)] + _np(ref, article="")
        return Caption(text, {"objects": [ref], "relations": [], "count": 1})
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return Caption(prefix + _np(ref), {"objects": [ref], "relations": [], "count": None})


def _caption_multi(objs: tuple[Obj, ...], rng: np.random.Generator) -> Caption:
    n = len(objs)
    kind = rng.random()
    pairs = [(i, j, rel) for i, j in itertools.permutations(range(n), 2) for rel in _relation(objs[i], objs[j])]
    if kind < P_RELATION and pairs:
        i, j, rel = pairs[rng.integers(len(pairs))]
        a, b = _ref(objs[i], rng), _ref(objs[j], rng)
        phrase = RELATION_PHRASES[rel][rng.integers(len(RELATION_PHRASES[rel]))]
        if rng.random() < 0.3:
            text = f"{_np(a, 'the')} is {phrase} {_np(b, 'the')}"
        else:
            text = f"{_np(a)} {phrase} {_np(b)}"
        return Caption(text, {"objects": [a, b], "relations": [[0, rel, 1]], "count": None})
    order = list(rng.permutation(n))
    if kind < P_RELATION + P_LIST:  # list every object, sometimes with the count
        refs = [_ref(objs[k], rng) for k in order]
        nps = [_np(r) for r in refs]
        listed = nps[0] if n == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
        if rng.random() < 0.4:
            noun = ["objects", "shapes"][rng.integers(2)]
            return Caption(f"{NUMBER_WORDS[n]} {noun}: {listed}", {"objects": refs, "relations": [], "count": n})
        return Caption(listed, {"objects": refs, "relations": [], "count": None})
    # mention one object and the count ("three shapes including a red star")
    ref = _ref(objs[order[0]], rng)
    noun = ["objects", "shapes"][rng.integers(2)]
    link = ["including", "with", "one of them"][rng.integers(3)]
    text = (
        f"{NUMBER_WORDS[n]} {noun} {link} {_np(ref)}"
        if link != "one of them"
        else f"{NUMBER_WORDS[n]} {noun}, one of them {_np(ref)}"
    )
    return Caption(text, {"objects": [ref], "relations": [], "count": n})


def make_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[Caption]:
    """Up to ``n`` distinct captions of the scene; the first always names every object by colour and shape."""
    objs = scene.objects
    full = [{"shape": o.shape, "colour": o.colour, "size": None} for o in objs]
    first_text = (
        " and ".join(_np(r) for r in full)
        if len(objs) <= 2
        else ", ".join(_np(r) for r in full[:-1]) + " and " + _np(full[-1])
    )
    caps = [Caption(first_text, {"objects": full, "relations": [], "count": None})]
    seen = {first_text}
    for _ in range(n * 6):
        if len(caps) >= n:
            break
        cap = _caption_single(objs[0], rng) if len(objs) == 1 else _caption_multi(objs, rng)
        if cap.text not in seen:
            seen.add(cap.text)
            caps.append(cap)
    return caps


def _region_holds(o: Obj, region: str) -> bool:
    checks = {
        "left": o.x < 0.5,
        "right": o.x > 0.5,
        "top": o.y < 0.5,
        "bottom": o.y > 0.5,
        "middle": 0.3 < o.x < 0.7 and 0.3 < o.y < 0.7,
    }
    return all(checks[part] for part in region.split())


def _relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    return {"left_of": a.x < b.x, "right_of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]


def satisfies(scene: Scene, meaning: dict) -> bool:
    """Whether a scene makes the caption with this meaning true (partial descriptions count)."""
    objs = scene.objects
    refs = meaning.get("objects", [])
    if meaning.get("count") is not None and meaning["count"] != len(objs):
        return False
    if len(refs) > len(objs):
        return False
    for assignment in itertools.permutations(range(len(objs)), len(refs)):
        ok = True
        for ref, k in zip(refs, assignment):
            o = objs[k]
            if any(ref.get(a) is not None and ref[a] != getattr(o, a) for a in ("shape", "colour", "size")):
                ok = False
                break
            if ref.get("region") and not _region_holds(o, ref["region"]):
                ok = False
                break
        if ok and all(
            _relation_holds(objs[assignment[i]], rel, objs[assignment[j]]) for i, rel, j in meaning.get("relations", [])
        ):
            return True
    return False


MISS_REASONS = ("shape missing", "colour missing", "size missing", "binding", "count", "relation", "region")


def why_false(scene: Scene, meaning: dict) -> str | None:
    """Why a caption is false of a scene (one of :data:`MISS_REASONS`), or None when it is true.

    An attribute the caption names that no object has is "shape missing", "colour missing" or "size
    missing" (checked in that order); every named attribute present, but not on objects as the caption
    binds them (or too few objects), is "binding"; the objects right but the number of objects, a
    relation or an object's region wrong is "count", "relation" or "region". Read over the top-1
    retrievals of a model, it says what the model confuses.
    """
    if satisfies(scene, meaning):
        return None
    refs = meaning.get("objects", [])
    for attr in ("shape", "colour", "size"):
        present = {getattr(o, attr) for o in scene.objects}
        if any(r.get(attr) is not None and r[attr] not in present for r in refs):
            return f"{attr} missing"
    placed = {"objects": [{k: v for k, v in r.items() if k != "region"} for r in refs], "relations": [], "count": None}
    if not satisfies(scene, placed):
        return "binding"
    if meaning.get("count") is not None and meaning["count"] != len(scene.objects):
        return "count"
    if meaning.get("relations") and not satisfies(scene, {**placed, "relations": meaning["relations"]}):
        return "relation"
    return "region"


def caption_kind(meaning: dict) -> str:
    """What a caption asks of a model: single (one object), region (one object and where it is), list (every
    object of a scene), relation (two objects and how they are placed), or count (how many, and one of them)."""
    refs = meaning.get("objects", [])
    if meaning.get("relations"):
        return "relation"
    if meaning.get("count") is not None and meaning["count"] > len(refs):
        return "count"
    if len(refs) > 1:
        return "list"
    return "region" if any(r.get("region") for r in refs) else "single"


def describes(scene: Scene, meaning: dict) -> bool:
    """Whether the caption with this meaning could have been written for this scene.

    Stricter than :func:`satisfies`: the caption must be true, and of a form ShapesWorld writes for a
    scene like this one. A bare phrase or a list of objects names every object of the scene ("a red
    circle" is written for a scene holding only a red circle, not for one that also holds a blue star);
    captions with a relation or a count may leave objects out. Used to tell which pairs of a training
    batch match, so that two captions of the same kind of scene are not pushed apart as negatives.
    """
    if not satisfies(scene, meaning):
        return False
    if meaning.get("relations") or meaning.get("count") is not None:
        return True
    return len(meaning.get("objects", [])) == len(scene.objects)


_REGION_PARTS = ("left", "right", "top", "bottom", "middle")
_RELATIONS = ("left_of", "right_of", "above", "below")
_PERMS = np.array(list(itertools.permutations(range(3))))  # (6, 3): object slot of each reference


def _encode_scenes(scenes: Sequence[Scene], n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """attrs (B, n, 3) int (-1: no object), x (B, n), y (B, n)."""
    lookup = (dict(zip(SHAPES, range(99))), dict(zip(COLOURS, range(99))), dict(zip(SIZES, range(99))))
    attrs = np.full((len(scenes), n, 3), -1, dtype=np.int64)
    xy = np.zeros((len(scenes), n, 2))
    for b, sc in enumerate(scenes):
        for k, o in enumerate(sc.objects[:n]):
            attrs[b, k] = (lookup[0][o.shape], lookup[1][o.colour], lookup[2][o.size])
            xy[b, k] = (o.x, o.y)
    return attrs, xy[..., 0], xy[..., 1]


def describes_matrix(scenes: Sequence[Scene], meanings: Sequence[dict]) -> np.ndarray:
    """(len(scenes), len(meanings)) bool: :func:`describes` for every pair, computed with array operations.

    Scenes have at most three objects and meanings at most three references (as ShapesWorld writes).
    """
    if any(len(sc.objects) > 3 for sc in scenes) or any(len(m.get("objects", [])) > 3 for m in meanings):
        return np.array([[describes(sc, m) for m in meanings] for sc in scenes])
    attrs, x, y = _encode_scenes(scenes)  # (B, 3, 3), (B, 3), (B, 3)
    B, T = len(scenes), len(meanings)
    lookup = (dict(zip(SHAPES, range(99))), dict(zip(COLOURS, range(99))), dict(zip(SIZES, range(99))))
    want = np.full((T, 3, 3), -1, dtype=np.int64)  # -1: any value
    active = np.zeros((T, 3), dtype=bool)
    region = np.zeros((T, 3, len(_REGION_PARTS)), dtype=bool)
    count = np.full(T, -1)
    structured = np.zeros(T, dtype=bool)  # has a relation or a count: may leave objects out
    rels = []  # (t, a, kind, b)
    for t, m in enumerate(meanings):
        for r, ref in enumerate(m.get("objects", [])):
            active[t, r] = True
            for a, key in enumerate(("shape", "colour", "size")):
                if ref.get(key) is not None:
                    want[t, r, a] = lookup[a].get(ref[key], -9)  # an unknown value matches nothing
            for part in (ref.get("region") or "").split():
                region[t, r, _REGION_PARTS.index(part)] = True
        if m.get("count") is not None:
            count[t] = m["count"]
        structured[t] = bool(m.get("relations")) or m.get("count") is not None
        rels.extend((t, a, _RELATIONS.index(kind), b) for a, kind, b in m.get("relations", []))
    exists = attrs[:, :, 0] >= 0  # (B, 3)
    n_obj, n_ref = exists.sum(1), active.sum(1)  # (B,), (T,)
    # does reference r of meaning t fit object o of scene b?  (B, T, r, o)
    attr_ok = ((want[None, :, :, None, :] == -1) | (want[None, :, :, None, :] == attrs[:, None, None, :, :])).all(-1)
    in_region = np.stack(
        [x < 0.5, x > 0.5, y < 0.5, y > 0.5, (x > 0.3) & (x < 0.7) & (y > 0.3) & (y < 0.7)], axis=-1
    )  # (B, 3, parts)
    region_ok = ~(region[None, :, :, None, :] & ~in_region[:, None, None, :, :]).any(-1)
    fit = attr_ok & region_ok & exists[:, None, None, :]
    fit |= ~active[None, :, :, None]  # references a meaning does not have fit anything
    rel_kind = np.stack(
        [
            x[:, :, None] < x[:, None, :],
            x[:, :, None] > x[:, None, :],
            y[:, :, None] < y[:, None, :],
            y[:, :, None] > y[:, None, :],
        ],
        axis=1,
    )  # (B, 4, o, o)
    ok_any = np.zeros((B, T), dtype=bool)
    for perm in _PERMS:  # reference r -> object perm[r]; the three slots are distinct, so it is injective
        ok = fit[:, :, 0, perm[0]] & fit[:, :, 1, perm[1]] & fit[:, :, 2, perm[2]]
        for t, a, kind, b in rels:
            ok[:, t] &= rel_kind[:, kind, perm[a], perm[b]]
        ok_any |= ok
    ok_any &= (count[None, :] < 0) | (count[None, :] == n_obj[:, None])
    ok_any &= n_ref[None, :] <= n_obj[:, None]
    return ok_any & (structured[None, :] | (n_ref[None, :] == n_obj[:, None]))


# ---------------------------------------------------------------------------------------------------
# Hard negatives: a caption edited so that it is no longer true of its scene


_FLIP_WORDS = {
    "left": "right",
    "right": "left",
    "top": "bottom",
    "bottom": "top",
    "upper": "lower",
    "lower": "upper",
    "above": "below",
    "over": "under",
    "below": "above",
    "under": "over",
    "beneath": "above",
}
_FLIP_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
_FLIP_REGION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "middle": "middle"}
_NEGATIVE_EDITS = ("swap_colours", "shape", "colour", "relation", "region", "size")


def _split_word(word: str) -> tuple[str, str]:
    core = word.rstrip(",:.")
    return core, word[len(core) :]


def _mentions(words: list[str], vocabulary: Sequence[str]) -> list[int]:
    return [i for i, w in enumerate(words) if _split_word(w)[0] in vocabulary]


def _set_word(words: list[str], i: int, new: str) -> None:
    words[i] = new + _split_word(words[i])[1]
    if i > 0 and words[i - 1] in ("a", "an"):  # keep the article right: "an orange", "a red"
        words[i - 1] = _article(new)


def _edit_caption(caption: Caption, kind: str, rng: np.random.Generator, heldout: set[str]) -> Caption | None:
    words, meaning = caption.text.split(" "), copy.deepcopy(caption.meaning)
    refs = meaning.get("objects", [])
    with_attr = {a: [r for r in refs if r.get(a) is not None] for a in ("colour", "shape", "size")}
    vocab = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}

    def allowed(ref: dict, colour: str | None, shape: str | None) -> bool:
        c, sh = colour or ref.get("colour"), shape or ref.get("shape")
        return not (c and sh and f"{c} {sh}" in heldout)

    if kind == "swap_colours":  # the same colours and shapes, bound the other way round
        pos = _mentions(words, vocab["colour"])
        if len(pos) != len(with_attr["colour"]) or len(pos) < 2:
            return None
        a, b = (int(x) for x in rng.choice(len(pos), 2, replace=False))
        ra, rb = with_attr["colour"][a], with_attr["colour"][b]
        if ra["colour"] == rb["colour"] or not (allowed(ra, rb["colour"], None) and allowed(rb, ra["colour"], None)):
            return None
        ca, cb = ra["colour"], rb["colour"]
        _set_word(words, pos[a], cb)
        _set_word(words, pos[b], ca)
        ra["colour"], rb["colour"] = cb, ca
    elif kind in ("shape", "colour", "size"):
        pos = _mentions(words, vocab[kind])
        if not pos or len(pos) != len(with_attr[kind]):
            return None
        m = int(rng.integers(len(pos)))
        ref = with_attr[kind][m]
        options = [
            v
            for v in vocab[kind]
            if v != ref[kind] and allowed(ref, v if kind == "colour" else None, v if kind == "shape" else None)
        ]
        new = options[int(rng.integers(len(options)))]
        _set_word(words, pos[m], new)
        ref[kind] = new
    elif kind == "relation":
        rels = meaning.get("relations", [])
        pos = _mentions(words, ("left", "right", "above", "over", "below", "under", "beneath"))
        if len(rels) != 1 or len(pos) != 1:
            return None
        _set_word(words, pos[0], _FLIP_WORDS[_split_word(words[pos[0]])[0]])
        rels[0][1] = _FLIP_RELATION[rels[0][1]]
    elif kind == "region":
        with_region = [r for r in refs if r.get("region")]
        pos = _mentions(words, ("left", "right", "top", "bottom", "upper", "lower"))
        if len(with_region) != 1 or not pos:
            return None
        for i in pos:
            _set_word(words, i, _FLIP_WORDS[_split_word(words[i])[0]])
        with_region[0]["region"] = " ".join(_FLIP_REGION[p] for p in with_region[0]["region"].split())
    else:
        raise ValueError(f"unknown caption edit {kind!r}; choose from {_NEGATIVE_EDITS}")
    return Caption(" ".join(words), meaning)


def negative_caption(
    scene: Scene, caption: Caption, rng: np.random.Generator, heldout: Sequence[str] = DEFAULT_HELDOUT
) -> Caption | None:
    """A minimal edit of a true caption that makes it false of the scene, or None if none was found.

    The edits are those bags-of-words models cannot tell apart (Yuksekgonul et al., 2023, NegCLIP):
    the colours of two objects swapped, one shape, colour or size changed, a relation or region flipped.
    The result names no held-out combination, so training never sees one, not even in a negative.
    """
    held = set(heldout)
    for k in rng.permutation(len(_NEGATIVE_EDITS)):
        edited = _edit_caption(caption, _NEGATIVE_EDITS[k], rng, held)
        if edited is not None and edited.text != caption.text and not satisfies(scene, edited.meaning):
            return edited
    return None


# ---------------------------------------------------------------------------------------------------
# Questions


def _unique_ref(o: Obj, objs: tuple[Obj, ...]) -> str:
    """The shortest 'the ...' phrase that picks out exactly this object."""
    others = [p for p in objs if p is not o]
    if not any(p.shape == o.shape for p in others):
        return f"the {o.shape}"
    if not any(p.shape == o.shape and p.colour == o.colour for p in others):
        return f"the {o.colour} {o.shape}"
    return f"the {o.size} {o.colour} {o.shape}"


def make_questions(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig | None = None) -> list[QA]:
    """Questions with known answers: colour, shape, size, count, existence and spatial relations."""
    objs = scene.objects
    qas: list[QA] = []
    target = objs[rng.integers(len(objs))]
    if sum(p.shape == target.shape for p in objs) == 1:
        qas.append(QA(f"what colour is the {target.shape}?", target.colour, "colour"))
    if sum(p.colour == target.colour for p in objs) == 1:
        qas.append(QA(f"what shape is the {target.colour} object?", target.shape, "shape"))
    qas.append(QA(f"is {_unique_ref(target, objs)} small or large?", target.size, "size"))
    if rng.random() < 0.5:
        qas.append(QA("how many objects are there?", str(len(objs)), "count"))
    else:
        colour = list(COLOURS)[rng.integers(len(COLOURS))] if rng.random() < 0.5 else target.colour
        qas.append(QA(f"how many {colour} objects are there?", str(sum(p.colour == colour for p in objs)), "count"))
    if rng.random() < 0.5:
        qas.append(QA(f"is there {_np({'colour': target.colour, 'shape': target.shape})}?", "yes", "exist"))
    else:
        present = {p.name for p in objs}
        pool = [c for c in all_combos() if c not in present and c not in (cfg.heldout if cfg else ())]
        absent = pool[rng.integers(len(pool))]
        colour, shape = absent.split()
        qas.append(QA(f"is there {_np({'colour': colour, 'shape': shape})}?", "no", "exist"))
    for a, b in itertools.permutations(objs, 2):
        rels = _relation(a, b)
        for rel in rels:
            # "what is left of B?" only when exactly one object is left of B at all
            if sum(_relation_holds(p, rel, b) for p in objs if p is not b) == 1:
                phrase = {
                    "left_of": "to the left of",
                    "right_of": "to the right of",
                    "above": "above",
                    "below": "below",
                }[rel]
                qas.append(QA(f"what is {phrase} {_unique_ref(b, objs)}?", a.name, "relation"))
                break
        if len(qas) >= 7:
            break
    return qas


# ---------------------------------------------------------------------------------------------------
# The world


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
        from .sound import render_sound

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
