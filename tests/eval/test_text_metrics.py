"""BLEU and CIDEr-D: hand values, values the COCO caption toolkit computed (hard-coded, so the default run
checks them without the toolkit) and, when the toolkit is installed (dev extra), a live comparison."""

import math

import numpy as np
import pytest

from mmfusion.data.shapes import ShapesWorld
from mmfusion.eval.text_metrics import bleu, cider, tokenize


def test_tokenize_lowercases_drops_punctuation_and_splits_clitics():
    words = ["two", "shapes", "a", "red", "circle", "and", "a", "blue", "star"]
    assert tokenize("Two shapes: a Red circle, and a blue star.") == words
    assert tokenize("The dog's ball isn't black-and-white!") == [
        "the",
        "dog",
        "'s",
        "ball",
        "is",
        "n't",
        "black-and-white",
    ]
    assert tokenize("3.5 m and 1,000 cats (really)") == ["3.5", "m", "and", "1,000", "cats", "really"]
    for text in ("Don't stop; it's 3.5 km.", "a red circle", "the cat's toys"):
        once = tokenize(text)
        assert tokenize(" ".join(once)) == once


# --- BLEU and CIDEr-D by hand -----------------------------------------------------------------------


def test_bleu_of_a_perfect_match_is_one():
    b = bleu({0: "a small red circle on the left"}, {0: ["a small red circle on the left", "a red circle"]})
    assert b.scores == pytest.approx([1.0] * 4, abs=1e-8)
    assert b.per_image[0] == pytest.approx([1.0] * 4, abs=1e-8)
    assert b.ratio == pytest.approx(1.0)


def test_bleu_brevity_penalty_and_the_toolkits_small_counts():
    # 3 words against a 6-word reference: all 1-3-grams match, no 4-gram exists, BP = exp(1 - 6/3)
    b = bleu({0: "a red circle"}, {0: ["a red circle on the left"]})
    bp = math.exp(1 - 6 / 3)
    assert b.scores[:3] == pytest.approx([bp] * 3, rel=1e-6)
    assert b.scores[3] == pytest.approx(bp * (1e-15 / 1e-9) ** 0.25, rel=1e-6)  # the 4-gram precision is ~1e-6
    assert (b.candidate_length, b.reference_length) == (3, 6)


def test_bleu_clips_repeats_and_takes_the_closest_reference_length():
    # 4 words; references of 6 and 2 words are both 2 away, and the toolkit then takes the shorter
    b = bleu({0: "the the the the"}, {0: ["the cat sat on a mat", "the cat"]})
    assert b.reference_length == 2
    assert b.scores[0] == pytest.approx(1 / 4, rel=1e-6)  # one "the" in either reference: one of four counts
    assert bleu({0: "the the the the"}, {0: ["the cat on the"]}).scores[0] == pytest.approx(2 / 4, rel=1e-6)


def test_bleu_is_pooled_over_the_corpus_not_averaged():
    cands = {"a": "a red circle and a blue star", "b": "a cross"}
    refs = {"a": ["a red circle and a blue star"], "b": ["a green square"]}
    b = bleu(cands, refs)
    # unigrams: 7 of 7 match in a, 1 ("a") of 2 in b -> 8/9 over the corpus; lengths 9 vs 10 -> BP exp(1 - 10/9)
    assert b.scores[0] == pytest.approx(8 / 9 * math.exp(1 - 10 / 9), rel=1e-6)
    assert b.per_image["b"][0] == pytest.approx(1 / 2 * math.exp(1 - 3 / 2), rel=1e-6)
    assert b.scores[0] != pytest.approx(np.mean([s[0] for s in b.per_image.values()]))


def test_cider_by_hand():
    # two images, each candidate equal to its single 2-word reference: cosine 1 for uni- and bigrams, no 3-
    # or 4-grams at all, so the mean over n = 1..4 is 1/2, times 10
    c = cider({0: "red circle", 1: "blue star"}, {0: ["red circle"], 1: ["blue star"]})
    assert c.score == pytest.approx(5.0)
    assert c.per_image == pytest.approx({0: 5.0, 1: 5.0})
    # one image: every n-gram of the references is in every image's references, so it weighs nothing
    assert cider({0: "a red circle"}, {0: ["a red circle"]}).score == 0.0
    # repeating a matched word gains nothing (clipping) and the length penalty takes some away
    twice = cider({0: "red red circle", 1: "blue star"}, {0: ["red circle"], 1: ["blue star"]})
    assert twice.per_image[0] < 5.0


def test_mismatched_ids_and_empty_references_are_refused():
    with pytest.raises(ValueError, match="same ids"):
        bleu({0: "a"}, {1: ["a"]})
    with pytest.raises(ValueError, match="one or more reference"):
        cider({0: "a"}, {0: []})


# --- against the COCO caption toolkit -----------------------------------------------------------------

IDENTICAL = {1: "a red circle and a blue star", 2: "a single green cross", 3: "two shapes a white square and a star"}
CORPORA = {
    "identical": (
        dict(IDENTICAL),
        {k: [v] for k, v in IDENTICAL.items()},
    ),
    "partial overlap": (
        {1: "a red circle and a red star", 2: "a green cross on the right", 3: "a white square below a cyan diamond"},
        {
            1: ["a red circle and a blue star", "a blue star to the right of a red circle"],
            2: ["a single green cross", "a green cross near the top"],
            3: ["a white square above a cyan diamond", "two objects a white square and a cyan diamond"],
        },
    ),
    "short candidates": (
        {1: "red", 2: "a star", 3: "circle", 4: ""},
        {1: ["a red circle", "a small red circle"], 2: ["a yellow star"], 3: ["a circle on the left"], 4: ["a cross"]},
    ),
    "repeated words": (
        {1: "red red red red circle circle", 2: "a a a a a", 3: "blue star blue star blue star"},
        {1: ["a red circle", "red circle"], 2: ["a purple diamond"], 3: ["a blue star", "the blue star is small"]},
    ),
    "many references": (
        {k: f"a {c} {s}" for k, (c, s) in enumerate([("red", "circle"), ("blue", "star"), ("green", "cross"),
                                                      ("white", "square"), ("cyan", "diamond")])},
        {k: [f"a {c} {s}", f"a small {c} {s}", f"there is a {c} {s} on the left", f"the {s} is {c}", f"one {s}"]
         for k, (c, s) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross"),
                                     ("white", "square"), ("yellow", "diamond")])},
    ),
}  # fmt: skip


def _shapes_corpus(n=40):
    """ShapesWorld captions: the second caption of each scene as the candidate, the others as references."""
    world = ShapesWorld()
    samples = [world.sample("test", i) for i in range(n)]
    cands = {i: " ".join(tokenize(s.captions[1].text)) for i, s in enumerate(samples)}
    refs = {i: [" ".join(tokenize(c.text)) for c in s.captions[:1] + s.captions[2:]] for i, s in enumerate(samples)}
    return cands, refs


@pytest.mark.parametrize("name", [*CORPORA, "shapesworld"])
def test_bleu_and_cider_equal_the_coco_toolkit(name):
    pytest.importorskip("pycocoevalcap", reason="the COCO caption toolkit is in the dev extra")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = CORPORA[name] if name in CORPORA else _shapes_corpus()
    res = {k: [v] for k, v in cands.items()}
    coco_bleu, coco_bleu_per_image = Bleu(4).compute_score(refs, res, verbose=0)
    ours = bleu(cands, refs, tokenized=True)
    assert ours.scores == pytest.approx(coco_bleu, rel=1e-9, abs=1e-12)
    for k in range(4):
        assert [ours.per_image[i][k] for i in cands] == pytest.approx(coco_bleu_per_image[k], rel=1e-9, abs=1e-12)
    coco_cider, coco_cider_per_image = Cider().compute_score(refs, res)
    c = cider(cands, refs, tokenized=True)
    assert c.score == pytest.approx(coco_cider, abs=1e-9)
    assert [c.per_image[i] for i in cands] == pytest.approx(list(coco_cider_per_image), abs=1e-9)


# pycocoevalcap 1.2 (pip install pycocoevalcap==1.2; Bleu(4).compute_score(refs, res, verbose=0) and
# Cider().compute_score(refs, res) with res = {k: [candidate]}) on the corpora above, to 12 significant digits:
# corpus BLEU-1..4, corpus CIDEr-D, and CIDEr-D per image in id order.
COCO_TOOLKIT = {
    "identical": (
        [0.999999999895, 0.99999999989, 0.999999999883, 0.999999999874],
        10.0,
        [10.0, 10.0, 10.0],
    ),
    "partial overlap": (
        [0.79999999992, 0.685994340498, 0.586437085526, 0.437598069753],
        3.49834675998,
        [3.75049900875, 2.43474175117, 4.30979952002],
    ),
    "short candidates": (
        [0.105399224509, 3.33301612939e-09, 1.05399224492e-08, 1.87429270767e-08],
        1.02290619165,
        [1.7930289237, 1.74338434976, 0.555211493154, 0.0],
    ),
    "repeated words": (
        [0.294117647042, 0.204980015409, 1.56318406501e-06, 4.67449923089e-09],
        0.739073482833,
        [1.20233225866, 0.0, 1.01488818983],
    ),
    "many references": (
        [0.866666666551, 0.778888096253, 0.714003698057, 0.0245626571235],
        2.89282667076,
        [3.89990992567, 1.54426742518, 3.89990992567, 3.85160357947, 1.26844249779],
    ),
}


@pytest.mark.parametrize("name", list(CORPORA))
def test_bleu_and_cider_equal_the_coco_toolkits_recorded_values(name):
    cands, refs = CORPORA[name]
    coco_bleu, coco_cider, coco_cider_per_image = COCO_TOOLKIT[name]
    assert bleu(cands, refs, tokenized=True).scores == pytest.approx(coco_bleu, rel=1e-9, abs=1e-12)
    c = cider(cands, refs, tokenized=True)
    assert c.score == pytest.approx(coco_cider, rel=1e-9, abs=1e-12)
    assert [c.per_image[i] for i in cands] == pytest.approx(coco_cider_per_image, rel=1e-9, abs=1e-12)
