"""Hard negatives by type, for measuring and training composition (ARO, SugarCrepe, NegCLIP).

Yuksekgonul et al., 2023 ("When and why vision-language models behave like bags-of-words", ARO) and Hsieh
et al., 2023 (SugarCrepe) test a model with a true caption against a minimally edited false one: the
attributes of two objects swapped, the order of a relation swapped, one attribute replaced, a count
changed. A bag-of-words model sees the same words in a swap and cannot tell the two apart.

Three generators, one job each:

- :func:`caption_negatives`: every false edit of a ShapesWorld caption, by type. Each is checked against
  the scene with :func:`~mmfusion.data.shapes.semantics.satisfies`, so no negative is true of the scene it
  is the negative of (a swap between two red objects is never emitted: it would describe the same scene).
- :func:`changed_scenes`: the same edits applied to the scene instead of the caption, for text-to-image
  (the caption must score its own image above a minimally changed one of which it is false).
- :func:`text_negatives`: rule-based word swaps of colour, shape, relation and number words in free text,
  for a user's captions, whose truth no program can check.

The types are the keys of :data:`NEGATIVE_TYPES`. A training loop can draw from the same functions
(:func:`hard_negative`) as the benchmark measures with.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .scene import COLOURS, SHAPES, SIZES, Obj, Scene
from .shapes.captions import NUMBER_WORDS, REGION_PHRASES, RELATION_PHRASES, Caption, a_or_an, noun_phrase
from .shapes.semantics import assignments, satisfies

NEGATIVE_TYPES: dict[str, str] = {
    "swap_colour": "the colours of two objects swapped",
    "swap_shape": "the shapes of two objects swapped",
    "swap_relation": "the two objects of a relation swapped (A left of B -> B left of A)",
    "replace_colour": "one object's colour replaced",
    "replace_shape": "one object's shape replaced",
    "replace_size": "one object's size replaced",
    "change_count": "the number of objects changed",
    "flip_region": "where a single object is, mirrored (on the left -> on the right)",
}
# Word swaps in free text cannot see sizes or regions.
TEXT_TYPES = ("swap_colour", "swap_shape", "swap_relation", "replace_colour", "replace_shape", "change_count")
_VOCAB = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}
_FLIP_REGION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_MARGIN, _GAP = 0.02, 0.04  # as sampling places objects: off the frame's edge, apart from each other


@dataclass(frozen=True)
class Negative:
    """A false caption made from a true one: its type (a key of :data:`NEGATIVE_TYPES`), text and meaning.

    ``meaning`` is None for a word swap in free text, whose meaning is unknown."""

    kind: str
    text: str
    meaning: dict | None = None


@dataclass(frozen=True)
class ChangedScene:
    """A scene minimally changed (one edit of :data:`NEGATIVE_TYPES`) so that a true caption of the original
    is false of it; ``what`` says the change in words."""

    kind: str
    scene: Scene
    what: str


# -- captions of a ShapesWorld scene -----------------------------------------------------------------------


def _core(word: str) -> str:
    return word.rstrip(",:.")


def _set_word(words: list[str], i: int, new: str) -> None:
    """Replace word ``i`` keeping its punctuation, and the article before it right ("an orange", "a red")."""
    words[i] = new + words[i][len(_core(words[i])) :]
    if i > 0 and words[i - 1] in ("a", "an"):
        words[i - 1] = a_or_an(new)


def _attribute_slots(words: list[str], refs: list[dict], attr: str) -> list[tuple[int, int]] | None:
    """(reference, word position) of each mention of ``attr`` in order, or None when words and references
    do not line up one to one (then no word edit is safe)."""
    pos = [i for i, w in enumerate(words) if _core(w) in _VOCAB[attr]]
    named = [r for r, ref in enumerate(refs) if ref.get(attr) is not None]
    return list(zip(named, pos)) if len(pos) == len(named) else None


def _edited(caption: Caption, kind: str, edits: dict[int, str], refs_edit: dict[tuple[int, str], str]) -> Negative:
    words, meaning = caption.text.split(" "), copy.deepcopy(caption.meaning)
    for i, new in edits.items():
        _set_word(words, i, new)
    for (r, attr), value in refs_edit.items():
        meaning["objects"][r][attr] = value
    return Negative(kind, " ".join(words), meaning)


def _swaps(caption: Caption, attr: str) -> list[Negative]:
    words, refs = caption.text.split(" "), caption.meaning.get("objects", [])
    slots = _attribute_slots(words, refs, attr) or []
    out = []
    for (ra, pa), (rb, pb) in itertools.combinations(slots, 2):
        va, vb = refs[ra][attr], refs[rb][attr]
        if va != vb:  # a swap of equal values would be the caption itself
            out.append(_edited(caption, f"swap_{attr}", {pa: vb, pb: va}, {(ra, attr): vb, (rb, attr): va}))
    return out


def _replacements(caption: Caption, attr: str) -> list[Negative]:
    words, refs = caption.text.split(" "), caption.meaning.get("objects", [])
    return [
        _edited(caption, f"replace_{attr}", {p: v}, {(r, attr): v})
        for r, p in _attribute_slots(words, refs, attr) or []
        for v in _VOCAB[attr]
        if v != refs[r][attr]
    ]


def _relation_swap(caption: Caption) -> list[Negative]:
    """The relation's order swapped, "A rel B" -> "B rel A" (only for text exactly as ShapesWorld writes it)."""
    m = caption.meaning
    if len(m.get("relations", [])) != 1 or len(m.get("objects", [])) != 2:
        return []
    i, rel, j = m["relations"][0]
    a, b = m["objects"][i], m["objects"][j]
    for phrase in RELATION_PHRASES[rel]:
        for article, link in (("a", ""), ("the", "is ")):  # "a red circle left of ..." or "the red circle is ..."

            def text_of(x: dict, y: dict, article: str = article, link: str = link, phrase: str = phrase) -> str:
                return f"{noun_phrase(x, article)} {link}{phrase} {noun_phrase(y, article)}"

            if text_of(a, b) == caption.text:
                meaning = {**copy.deepcopy(m), "objects": copy.deepcopy([b, a]), "relations": [[0, rel, 1]]}
                return [Negative("swap_relation", text_of(b, a), meaning)]
    return []


def _count_changes(caption: Caption) -> list[Negative]:
    """Another count, "two shapes including ..." -> "three shapes including ...".

    Counts of one ("a single red circle") are left alone: the negative would need a plural the meaning cannot
    hold ("two red circles")."""
    m, words = caption.meaning, caption.text.split(" ")
    n = m.get("count")
    if n is None or n < 2 or _core(words[0]) != NUMBER_WORDS.get(n):
        return []
    least = max(2, len(m.get("objects", [])))  # never fewer than the objects the caption lists
    return [
        Negative("change_count", " ".join([NUMBER_WORDS[k] + words[0][len(_core(words[0])) :], *words[1:]]),
                 {**copy.deepcopy(m), "count": k})
        for k in NUMBER_WORDS
        if k != n and k >= least
    ]  # fmt: skip


def _region_flips(caption: Caption) -> list[Negative]:
    refs = caption.meaning.get("objects", [])
    if len(refs) != 1 or not refs[0].get("region"):
        return []
    region = refs[0]["region"]
    parts = region.split()
    out = []
    for k in range(len(parts)):  # "top left" -> "bottom left" and "top right"
        if parts[k] not in _FLIP_REGION:
            continue
        new = " ".join(_FLIP_REGION[p] if n == k else p for n, p in enumerate(parts))
        for idx, phrase in enumerate(REGION_PHRASES[region]):
            if caption.text.endswith(" " + phrase):
                new_phrase = REGION_PHRASES[new][idx % len(REGION_PHRASES[new])]
                meaning = copy.deepcopy(caption.meaning)
                meaning["objects"][0]["region"] = new
                out.append(Negative("flip_region", caption.text[: -len(phrase)] + new_phrase, meaning))
                break
    return out


_CAPTION_EDITS = {
    "swap_colour": lambda c: _swaps(c, "colour"),
    "swap_shape": lambda c: _swaps(c, "shape"),
    "swap_relation": _relation_swap,
    "replace_colour": lambda c: _replacements(c, "colour"),
    "replace_shape": lambda c: _replacements(c, "shape"),
    "replace_size": lambda c: _replacements(c, "size"),
    "change_count": _count_changes,
    "flip_region": _region_flips,
}


def _names_avoided(meaning: dict, avoid: Collection[str]) -> bool:
    return any(f"{r.get('colour')} {r.get('shape')}" in avoid for r in meaning.get("objects", []))


def _check_kinds(kinds: Iterable[str], allowed: Sequence[str]) -> list[str]:
    kinds = list(kinds)
    bad = [k for k in kinds if k not in allowed]
    if bad:
        raise ValueError(f"unknown negative type(s) {bad}; choose from {list(allowed)}")
    return kinds


def caption_negatives(
    scene: Scene, caption: Caption, kinds: Iterable[str] = NEGATIVE_TYPES, avoid: Collection[str] = ()
) -> list[Negative]:
    """Every hard negative of a true caption, of the given types, each false of the scene.

    Args:
        scene: the scene the caption describes; a negative it makes true is dropped.
        caption: a true caption of the scene with its meaning (an untrue one gives no negatives).
        kinds: which types of :data:`NEGATIVE_TYPES` to make.
        avoid: 'colour shape' combinations no negative may name (held-out ones, for training).

    Returns:
        The negatives, grouped by type in the order of ``kinds``; empty for a type the caption cannot have.
    """
    kinds = _check_kinds(kinds, list(NEGATIVE_TYPES))
    if not satisfies(scene, caption.meaning):
        return []
    avoid = set(avoid)
    out, seen = [], {caption.text}
    for kind in kinds:
        for neg in _CAPTION_EDITS[kind](caption):
            assert neg.meaning is not None
            if neg.text in seen or _names_avoided(neg.meaning, avoid) or satisfies(scene, neg.meaning):
                continue
            seen.add(neg.text)
            out.append(neg)
    return out


def hard_negative(
    scene: Scene,
    captions: Sequence[Caption],
    rng: np.random.Generator,
    kinds: Iterable[str] = NEGATIVE_TYPES,
    avoid: Collection[str] = (),
) -> tuple[Caption, Negative] | None:
    """One random hard negative for a scene (NegCLIP-style training): a type, then a caption that has one of
    that type, then one of them; None when no caption of the scene has any."""
    kinds = list(kinds)  # a type listed twice is tried first twice as often, and tried once
    for kind in dict.fromkeys(kinds[k] for k in rng.permutation(len(kinds))):
        pairs = [(c, n) for c in captions for n in caption_negatives(scene, c, [kind], avoid)]
        if pairs:
            return pairs[int(rng.integers(len(pairs)))]
    return None


# -- minimally changed scenes, for text-to-image -----------------------------------------------------------


def fits(objects: Sequence[Obj]) -> bool:
    """Whether objects lie inside the frame and apart, as :mod:`~mmfusion.data.shapes.sampling` places them."""
    inside = all(o.radius + _MARGIN <= v <= 1 - o.radius - _MARGIN for o in objects for v in (o.x, o.y))
    return inside and all(
        (a.x - b.x) ** 2 + (a.y - b.y) ** 2 > (a.radius + b.radius + _GAP) ** 2
        for a, b in itertools.combinations(objects, 2)
    )


def _with(scene: Scene, objects: Iterable[Obj]) -> Scene:
    return replace(scene, objects=tuple(objects))


def _scene_edits(scene: Scene, caption: Caption, kind: str, rng: np.random.Generator) -> list[ChangedScene]:
    m, objs = caption.meaning, list(scene.objects)
    match = next(assignments(scene, m), None)
    if match is None:
        return []
    refs = m.get("objects", [])
    out = []
    if kind in ("swap_colour", "swap_shape"):
        attr = kind.removeprefix("swap_")
        for ra, rb in itertools.combinations(range(len(refs)), 2):
            a, b = match[ra], match[rb]
            va, vb = getattr(objs[a], attr), getattr(objs[b], attr)
            if va != vb and refs[ra].get(attr) is not None and refs[rb].get(attr) is not None:
                new = list(objs)
                new[a], new[b] = replace(objs[a], **{attr: vb}), replace(objs[b], **{attr: va})
                out.append(ChangedScene(kind, _with(scene, new), f"the {attr}s of the {objs[a].name} and the "
                                        f"{objs[b].name} swapped"))  # fmt: skip
    elif kind == "swap_relation":
        for i, _, j in m.get("relations", []):
            a, b = match[i], match[j]
            new = list(objs)
            new[a], new[b] = replace(objs[a], x=objs[b].x, y=objs[b].y), replace(objs[b], x=objs[a].x, y=objs[a].y)
            out.append(ChangedScene(kind, _with(scene, new), f"the {objs[a].name} and the {objs[b].name} swap places"))
    elif kind.startswith("replace_"):
        attr = kind.removeprefix("replace_")
        for r, k in enumerate(match):
            if refs[r].get(attr) is None:
                continue
            for v in _VOCAB[attr]:
                if v != getattr(objs[k], attr):
                    new = [replace(o, **{attr: v}) if n == k else o for n, o in enumerate(objs)]
                    now = f"{new[k].size} {new[k].name}" if attr == "size" else new[k].name
                    out.append(ChangedScene(kind, _with(scene, new), f"the {objs[k].name} became {a_or_an(now)} {now}"))
    elif kind == "change_count" and m.get("count") is not None:
        for k in range(len(objs)):  # take away an object the caption does not name
            if k not in match and len(objs) > 1:
                out.append(ChangedScene(kind, _with(scene, objs[:k] + objs[k + 1 :]), f"the {objs[k].name} removed"))
        added = _added_object(objs, rng)
        if added is not None:
            out.append(ChangedScene(kind, _with(scene, [*objs, added]), f"{a_or_an(added.name)} {added.name} added"))
    elif kind == "flip_region":
        for r, k in enumerate(match):
            parts = (refs[r].get("region") or "").split()
            o = objs[k]
            flipped = replace(
                o,
                x=1 - o.x if {"left", "right"} & set(parts) else o.x,
                y=1 - o.y if {"top", "bottom"} & set(parts) else o.y,
            )
            if flipped != o:
                new = [flipped if n == k else p for n, p in enumerate(objs)]
                out.append(ChangedScene(kind, _with(scene, new), f"the {o.name} mirrored"))
    return out


def _added_object(objs: Sequence[Obj], rng: np.random.Generator, tries: int = 200) -> Obj | None:
    """A random small object placed where it overlaps nothing, or None when no place was found."""
    for _ in range(tries):
        r = SIZES["small"]
        x, y = rng.uniform(r + _MARGIN, 1 - r - _MARGIN, size=2)
        o = Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))], "small",
                float(x), float(y))  # fmt: skip
        if fits([*objs, o]):
            return o
    return None


def changed_scenes(
    scene: Scene,
    caption: Caption,
    rng: np.random.Generator,
    kinds: Iterable[str] = NEGATIVE_TYPES,
    avoid: Collection[str] = (),
) -> list[ChangedScene]:
    """Minimally changed copies of a scene of which a true caption is false, by type (text-to-image).

    The edit is made to the objects the caption names: their colours or shapes swapped, their places
    swapped (relations), one attribute replaced, an object added or taken away (counts), an object
    mirrored (regions). A change is kept only when the caption is false of the new scene, the objects
    still fit the frame without overlapping, and no object has an ``avoid`` combination.

    Args:
        rng: where an added object goes and what it is.
    """
    kinds = _check_kinds(kinds, list(NEGATIVE_TYPES))
    avoid = set(avoid)
    out = []
    for kind in kinds:
        for ch in _scene_edits(scene, caption, kind, rng):
            objs = ch.scene.objects
            changed = ch.scene != scene and fits(objs) and not any(o.name in avoid for o in objs)
            if changed and not satisfies(ch.scene, caption.meaning):
                out.append(ch)
    return out


# -- free text: rule-based word swaps --------------------------------------------------------------------

COLOUR_WORDS = (*COLOURS, "pink", "brown", "black", "grey", "gold", "silver")
SHAPE_WORDS = (*SHAPES, "rectangle", "oval", "heart", "hexagon", "ring")
COUNT_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ALIASES = {"gray": "grey"}  # spellings of one word: never a swap of the two
# Asymmetric relations only: swapping the objects of "next to" would say the same thing.
RELATION_WORDS = tuple(
    sorted(
        {p for ps in RELATION_PHRASES.values() for p in ps}
        | {"on top of", "in front of", "behind", "inside", "underneath", "to the right of", "to the left of"},
        key=len,
        reverse=True,
    )
)
_PREFIX = re.compile(r"^(an? (?:photo|picture|image|drawing|painting) of |there (?:is|are) |a scene with )", re.I)
_WORD = re.compile(r"[A-Za-z]+")


def _like(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def _replace_words(text: str, spans: dict[tuple[int, int], str]) -> str:
    """Put new words at the given (start, end) spans, fixing an article just before one ("a red" -> "an orange")."""
    out, last = [], 0
    for (s, e), new in sorted(spans.items()):
        before = text[last:s]
        art = re.search(r"\b(an?)(\s+)$", before, re.I)
        if art:
            before = before[: art.start()] + _like(a_or_an(new.lower()), art.group(1)) + art.group(2)
        out += [before, _like(new, text[s:e])]
        last = e
    return "".join(out) + text[last:]


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def _find_words(text: str, words: Sequence[str]) -> list[tuple[tuple[int, int], str, bool]]:
    """(span, word as in ``words``, plural) of each mention of one of ``words``, singular or plural."""
    lookup = {w: (w, False) for w in words} | {_plural(w): (w, True) for w in words}
    lookup |= {a: (w, False) for a, w in _ALIASES.items() if w in words}
    return [(m.span(), *lookup[m.group().lower()]) for m in _WORD.finditer(text) if m.group().lower() in lookup]


def _word_swaps(text: str, words: Sequence[str], kind: str) -> list[Negative]:
    found = _find_words(text, words)

    def spelled(word: str, plural: bool) -> str:
        return _plural(word) if plural else word

    if kind.startswith("swap_"):
        return [
            Negative(kind, _replace_words(text, {sa: spelled(wb, pa), sb: spelled(wa, pb)}))
            for (sa, wa, pa), (sb, wb, pb) in itertools.combinations(found, 2)
            if wa != wb
        ]
    present = {w for _, w, _ in found}
    return [
        Negative(kind, _replace_words(text, {span: spelled(v, plural)}))
        for span, _, plural in found
        for v in words
        if v not in present
    ]


def _count_swaps(text: str) -> list[Negative]:
    out = []
    for m in _WORD.finditer(text):
        w = m.group().lower()
        if w in COUNT_WORDS:
            k = COUNT_WORDS.index(w)
            for j in (k - 1, k + 1):
                if 0 <= j < len(COUNT_WORDS):
                    out.append(Negative("change_count", _replace_words(text, {m.span(): COUNT_WORDS[j]})))
    for m in re.finditer(r"\b([2-9])\b", text):
        for j in (int(m.group()) - 1, int(m.group()) + 1):
            if j >= 2:
                out.append(Negative("change_count", text[: m.start()] + str(j) + text[m.end() :]))
    return out


def _relation_order_swap(text: str) -> list[Negative]:
    """The relation's order swapped, "a dog left of a cat" -> "a cat left of a dog" ("the dog is ..." too)."""
    low = text.lower()
    for phrase in RELATION_WORDS:
        hits = [m for m in re.finditer(rf"\b{re.escape(phrase)}\b", low)]
        if len(hits) != 1:
            continue
        s, e = hits[0].span()
        prefix = _PREFIX.match(text[:s])
        head = prefix.group() if prefix else ""
        left, right = text[len(head) : s].strip(), text[e:].strip()
        end = re.search(r"[.!]$", right)
        right = right[:-1] if end else right
        verb = re.search(r"\s+(is|are)$", left)
        left = left[: verb.start()] if verb else left
        if not (0 < len(left.split()) <= 5 and 0 < len(right.split()) <= 5):
            return []
        link = f" {verb.group(1)} " if verb else " "
        a, b = (right[0].upper() + right[1:], left[0].lower() + left[1:]) if left[:1].isupper() else (right, left)
        swapped = f"{head}{a}{link}{text[s:e]} {b}{end.group() if end else ''}"
        return [Negative("swap_relation", swapped)] if swapped.lower() != text.lower() else []
    return []


def text_negatives(text: str, kinds: Iterable[str] = TEXT_TYPES) -> list[Negative]:
    """Hard negatives of a free-text caption by word swaps (its truth is not checked: nothing knows the image).

    Colour words (:data:`COLOUR_WORDS`) and shape words (:data:`SHAPE_WORDS`) are swapped in pairs or replaced
    by one the caption does not use; the two noun phrases around one asymmetric relation
    (:data:`RELATION_WORDS`) change places; a number word (two to ten, or a digit) goes one up or down.

    Returns:
        The negatives, each of a type in ``kinds`` (from :data:`TEXT_TYPES`), distinct and unlike the text.
    """
    kinds = _check_kinds(kinds, TEXT_TYPES)
    make = {
        "swap_colour": lambda: _word_swaps(text, COLOUR_WORDS, "swap_colour"),
        "swap_shape": lambda: _word_swaps(text, SHAPE_WORDS, "swap_shape"),
        "swap_relation": lambda: _relation_order_swap(text),
        "replace_colour": lambda: _word_swaps(text, COLOUR_WORDS, "replace_colour"),
        "replace_shape": lambda: _word_swaps(text, SHAPE_WORDS, "replace_shape"),
        "change_count": lambda: _count_swaps(text),
    }
    out, seen = [], {text}
    for kind in kinds:
        for neg in make[kind]():
            if neg.text not in seen:
                seen.add(neg.text)
                out.append(neg)
    return out


__all__ = [
    "NEGATIVE_TYPES",
    "TEXT_TYPES",
    "ChangedScene",
    "Negative",
    "caption_negatives",
    "changed_scenes",
    "fits",
    "hard_negative",
    "text_negatives",
]
