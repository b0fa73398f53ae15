"""Hard negative captions: a true caption minimally edited so that it is false of its scene (NegCLIP).

Yuksekgonul et al., 2023, "When and why vision-language models behave like bags-of-words": swapping two
colours, changing one attribute, or flipping a relation or region keeps the words a bag-of-words model
sees nearly the same, so training against such negatives teaches binding and word order.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from ..scene import COLOURS, DEFAULT_HELDOUT, SHAPES, SIZES, Scene
from .captions import Caption, a_or_an
from .semantics import satisfies

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
        words[i - 1] = a_or_an(new)


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
