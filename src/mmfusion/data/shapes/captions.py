"""ShapesWorld captions: natural text, plus a meaning in structured form that any scene can be checked against.

A caption names objects (mostly by colour and shape, sometimes with size or region), a spatial relation
between two of them, a list of every object, or a count. Its meaning, ``{"objects": [...], "relations":
[[i, rel, j]], "count": n | None}``, is what :mod:`.semantics` checks, so a retrieved image can be
judged right or wrong without a person.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..scene import Obj, Scene

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


@dataclass(frozen=True)
class Caption:
    """A caption and its meaning: ``{"objects": [...], "relations": [[i, rel, j]], "count": n | None}``.

    Each object reference may leave attributes out (``None``); a scene satisfies the caption when the
    references map to distinct objects of the scene with those attributes and the relations hold.
    """

    text: str
    meaning: dict


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


def a_or_an(word: str) -> str:
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


def _ref(o: Obj, rng: np.random.Generator, full: bool = False) -> dict:
    """Which attributes a caption mentions for this object (mostly colour and shape, sometimes fewer)."""
    r = 1.0 if full else rng.random()
    ref = {"shape": o.shape, "colour": o.colour, "size": o.size if rng.random() < P_SIZE else None}
    if r < P_SHAPE_ONLY:
        ref["colour"] = None
    elif r < P_SHAPE_ONLY + P_COLOUR_ONLY:
        ref["shape"] = None
    return ref


def noun_phrase(ref: dict, article: str = "a") -> str:
    words = [w for w in (ref.get("size"), ref.get("colour")) if w]
    noun = ref.get("shape") or ("object" if len(words) == 0 else ["shape", "object"][len(words) % 2])
    words.append(noun)
    if article == "a":
        article = a_or_an(words[0])
    return f"{article} {' '.join(words)}" if article else " ".join(words)


def stated_relations(a: Obj, b: Obj) -> list[str]:
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
        text = f"{noun_phrase(ref)} {phrases[rng.integers(len(phrases))]}"
        return Caption(text, {"objects": [ref], "relations": [], "count": None})
    if kind < P_REGION + P_SINGLE:
        text = ["a single ", "just one ", "only one "][rng.integers(3)] + noun_phrase(ref, article="")
        return Caption(text, {"objects": [ref], "relations": [], "count": 1})
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return Caption(prefix + noun_phrase(ref), {"objects": [ref], "relations": [], "count": None})


def _caption_multi(objs: tuple[Obj, ...], rng: np.random.Generator) -> Caption:
    n = len(objs)
    kind = rng.random()
    pairs = [(i, j, rel) for i, j in itertools.permutations(range(n), 2) for rel in stated_relations(objs[i], objs[j])]
    if kind < P_RELATION and pairs:
        i, j, rel = pairs[rng.integers(len(pairs))]
        a, b = _ref(objs[i], rng), _ref(objs[j], rng)
        phrase = RELATION_PHRASES[rel][rng.integers(len(RELATION_PHRASES[rel]))]
        if rng.random() < 0.3:
            text = f"{noun_phrase(a, 'the')} is {phrase} {noun_phrase(b, 'the')}"
        else:
            text = f"{noun_phrase(a)} {phrase} {noun_phrase(b)}"
        return Caption(text, {"objects": [a, b], "relations": [[0, rel, 1]], "count": None})
    order = list(rng.permutation(n))
    if kind < P_RELATION + P_LIST:  # list every object, sometimes with the count
        refs = [_ref(objs[k], rng) for k in order]
        nps = [noun_phrase(r) for r in refs]
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
        f"{NUMBER_WORDS[n]} {noun} {link} {noun_phrase(ref)}"
        if link != "one of them"
        else f"{NUMBER_WORDS[n]} {noun}, one of them {noun_phrase(ref)}"
    )
    return Caption(text, {"objects": [ref], "relations": [], "count": n})


def make_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[Caption]:
    """Up to ``n`` distinct captions of the scene; the first always names every object by colour and shape."""
    objs = scene.objects
    full = [{"shape": o.shape, "colour": o.colour, "size": None} for o in objs]
    first_text = (
        " and ".join(noun_phrase(r) for r in full)
        if len(objs) <= 2
        else ", ".join(noun_phrase(r) for r in full[:-1]) + " and " + noun_phrase(full[-1])
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
