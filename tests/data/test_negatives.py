"""Hard negatives: every one describes a different scene, and says so in words that match its meaning."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from mmfusion.data.negatives import (
    NEGATIVE_TYPES,
    TEXT_TYPES,
    caption_negatives,
    changed_scenes,
    fits,
    hard_negative,
    text_negatives,
)
from mmfusion.data.scene import COLOURS, DEFAULT_HELDOUT, SHAPES, SIZES, Obj, Scene
from mmfusion.data.shapes import NUMBER_WORDS, Caption, ShapesWorld, satisfies


def _scenes(n: int = 250):
    """Test, held-out and (past the curriculum) training scenes, with their captions."""
    world = ShapesWorld()
    for split, start in (("test", 0), ("heldout", 0), ("train", 100_000)):
        for i in range(start, start + n):
            scene = world.scene(split, i)
            yield scene, world.captions(scene)


@pytest.fixture(scope="module")
def generated():
    """(scene, caption, negative) for every negative of every caption of 750 scenes."""
    return [(s, c, neg) for s, caps in _scenes() for c in caps for neg in caption_negatives(s, c)]


def _words(text: str, vocab) -> list[str]:
    return [w.rstrip(",:.") for w in text.split() if w.rstrip(",:.") in vocab]


def _bag(text: str) -> Counter:
    """The words of a text, articles made one ("a" and "an"): what a bag-of-words model sees."""
    return Counter("a" if w == "an" else w.rstrip(",:.") for w in text.split())


def test_every_type_is_made_and_every_negative_is_false_of_its_scene(generated):
    assert {neg.kind for _, _, neg in generated} == set(NEGATIVE_TYPES)
    for scene, cap, neg in generated:
        assert satisfies(scene, cap.meaning), cap.text
        assert not satisfies(scene, neg.meaning), (cap.text, neg.text)
        assert neg.text != cap.text


def test_negative_text_says_what_its_meaning_says(generated):
    for _, _, neg in generated:
        refs = neg.meaning["objects"]
        for attr, vocab in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
            assert _words(neg.text, vocab) == [r[attr] for r in refs if r.get(attr)], (neg.kind, neg.text)
        if neg.meaning.get("count", 0) and neg.meaning["count"] > 1:
            assert neg.text.split()[0] == NUMBER_WORDS[neg.meaning["count"]]
        assert " a orange" not in f" {neg.text}" and " an red" not in f" {neg.text}"


def test_swaps_keep_the_words_and_never_swap_equal_values(generated):
    for _, cap, neg in generated:
        old, new = cap.meaning["objects"], neg.meaning["objects"]
        if neg.kind in ("swap_colour", "swap_shape"):
            attr = neg.kind.removeprefix("swap_")
            changed = [k for k in range(len(old)) if old[k] != new[k]]
            assert len(changed) == 2, (cap.text, neg.text)
            a, b = changed
            assert old[a][attr] != old[b][attr]  # never a swap between two objects of one colour (or shape)
            assert (new[a][attr], new[b][attr]) == (old[b][attr], old[a][attr])
            assert _bag(neg.text) == _bag(cap.text)
        elif neg.kind == "swap_relation":
            assert new == old[::-1] and neg.meaning["relations"] == cap.meaning["relations"]
            assert _bag(neg.text) == _bag(cap.text)
        elif neg.kind.startswith("replace_"):
            attr = neg.kind.removeprefix("replace_")
            diffs = [(k, a) for k in range(len(old)) for a in old[k] if old[k][a] != new[k][a]]
            assert len(diffs) == 1 and diffs[0][1] == attr
        elif neg.kind == "change_count":
            assert neg.meaning["count"] >= max(2, len(new)) and new == old


def test_same_coloured_objects_are_never_swapped():
    """A swap between two red objects describes the same scene; so does a shape swap of two red objects."""
    scene = Scene((Obj("circle", "red", "small", 0.25, 0.5), Obj("square", "red", "small", 0.75, 0.5)), 40)
    cap = Caption(
        "a red circle and a red square",
        {"objects": [{"shape": "circle", "colour": "red", "size": None},
                     {"shape": "square", "colour": "red", "size": None}], "relations": [], "count": None},
    )  # fmt: skip
    kinds = Counter(n.kind for n in caption_negatives(scene, cap))
    assert kinds["swap_colour"] == 0 and kinds["swap_shape"] == 0
    assert kinds["replace_colour"] == 2 * (len(COLOURS) - 1)
    # the scene edit too: swapping the colours of two red objects changes nothing
    assert not changed_scenes(scene, cap, np.random.default_rng(0), ["swap_colour"])


def test_held_out_combinations_are_avoided():
    for scene, caps in _scenes(80):
        for cap in caps:
            for neg in caption_negatives(scene, cap, avoid=DEFAULT_HELDOUT):
                assert not any(f"{r['colour']} {r['shape']}" in DEFAULT_HELDOUT for r in neg.meaning["objects"])
            for ch in changed_scenes(scene, cap, np.random.default_rng(0), avoid=DEFAULT_HELDOUT):
                assert not any(o.name in DEFAULT_HELDOUT for o in ch.scene.objects)


def test_changed_scenes_are_minimal_and_make_the_caption_false():
    made = Counter()
    for scene, caps in _scenes(150):
        rng = np.random.default_rng(scene.index)
        for cap in caps:
            for ch in changed_scenes(scene, cap, rng):
                made[ch.kind] += 1
                new = ch.scene.objects
                assert not satisfies(ch.scene, cap.meaning) and fits(new) and ch.scene != scene
                if ch.kind == "change_count":
                    assert abs(len(new) - len(scene.objects)) == 1
                    continue
                assert len(new) == len(scene.objects)
                diffs = [(a, b) for a, b in zip(scene.objects, new) if a != b]
                if ch.kind in ("swap_colour", "swap_shape"):
                    attr = ch.kind.removeprefix("swap_")
                    (a1, b1), (a2, b2) = diffs
                    assert getattr(a1, attr) != getattr(a2, attr)
                    assert replace(a1, **{attr: getattr(a2, attr)}) == b1
                    assert replace(a2, **{attr: getattr(a1, attr)}) == b2
                elif ch.kind == "swap_relation":
                    (a1, b1), (a2, b2) = diffs
                    assert (b1.x, b1.y, b2.x, b2.y) == (a2.x, a2.y, a1.x, a1.y)
                else:  # one object, one attribute (or its place, for a region)
                    assert len(diffs) == 1
    assert set(made) == set(NEGATIVE_TYPES)


def test_hard_negative_is_false_and_repeatable():
    world = ShapesWorld()
    for i in range(30):
        scene = world.scene("test", i)
        caps = world.captions(scene)
        a = hard_negative(scene, caps, np.random.default_rng(i))
        assert a == hard_negative(scene, caps, np.random.default_rng(i))
        assert a is not None and not satisfies(scene, a[1].meaning) and a[0] in caps


def test_unknown_type_is_named():
    scene = ShapesWorld().scene("test", 0)
    with pytest.raises(ValueError, match="swap_colour"):
        caption_negatives(scene, ShapesWorld().captions(scene)[0], ["swap_color"])


def _by_kind(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in text_negatives(text):
        out.setdefault(n.kind, []).append(n.text)
    return out


def test_word_swaps_in_free_text():
    neg = _by_kind("A red car to the left of a blue bicycle.")
    assert neg["swap_colour"] == ["A blue car to the left of a red bicycle."]
    assert neg["swap_relation"] == ["A blue bicycle to the left of a red car."]
    assert "An orange car to the left of a blue bicycle." in neg["replace_colour"]  # the article follows
    assert all("blue" not in t.split()[1] for t in neg["replace_colour"])  # replaced by a colour not yet used
    neg = _by_kind("two red circles and a blue square")
    assert neg["swap_shape"] == ["two red squares and a blue circle"]  # plurals stay plural
    assert neg["change_count"] == ["three red circles and a blue square"]
    neg = _by_kind("the dog is above the cat")
    assert neg["swap_relation"] == ["the cat is above the dog"]


def test_word_swaps_leave_alone_what_would_not_change_the_meaning():
    assert "swap_relation" not in _by_kind("a dog next to a cat")  # symmetric
    assert "swap_colour" not in _by_kind("a grey cat and a gray dog")  # one colour, two spellings
    assert text_negatives("a dog sleeping on a sofa") == []
    for text in ("A red car to the left of a blue bicycle.", "two red circles and a blue square"):
        negs = text_negatives(text)
        assert {n.kind for n in negs} <= set(TEXT_TYPES)
        assert len({n.text for n in negs}) == len(negs) and text not in {n.text for n in negs}
