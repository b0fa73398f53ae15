"""VQA accuracy: answer normalisation, exact match and consensus on hand-made cases, and the report end to end
with a fake answerer on ShapesWorld questions."""

import json
from collections import Counter

import numpy as np
import pytest

from mmfusion.data.export import export_shapes
from mmfusion.data.shapes import ShapesWorld
from mmfusion.eval.vqa import consensus_score, evaluate_answerer, normalize_answer, summary_lines, vqa_accuracy


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two.", "2"),
        ("  YES!\n", "yes"),
        ("the red circle", "red circle"),
        ("a purple one", "purple 1"),  # number words become digits wherever they are, as in the VQA script
        ("none", "0"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # once a number like 1,000 occurs, punctuation is deleted, not spaced
        ("red-white", "red white"),  # punctuation between letters becomes a space...
        ("red - white", "red white"),  # ...and next to a space it goes
        ("(left)", "left"),
        ("dont", "don't"),
        ("It's", "it's"),  # apostrophes are kept
        ("to the left of the star", "to left of star"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_overall_and_per_type():
    preds = ["Red", "two", "yes.", "circle", "blue", "3"]
    answers = ["red", "2", "no", "square", "blue", "3"]
    types = ["colour", "count", "exist", "shape", "colour", "count"]
    s = vqa_accuracy(preds, answers, types)
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.per_type == {"colour": 1.0, "count": 1.0, "exist": 0.0, "shape": 0.0}
    assert s.counts == {"colour": 2, "count": 2, "exist": 1, "shape": 1}
    assert s.correct == [True, True, False, False, True, True]
    assert s.consensus is None  # one reference answer each: nothing to add
    assert vqa_accuracy(["x"], ["x"]).per_type == {"all": 1.0}
    assert vqa_accuracy(["x", "y"], ["x", "z"], [None, "t"]).per_type == {"other": 1.0, "t": 0.0}


def test_consensus_of_ten_references():
    refs = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2" leaves 2 matches (2/3), leaving out a "3" leaves 3 (1): (3*2/3 + 7)/10
    assert consensus_score("2", refs) == pytest.approx(0.9)
    assert consensus_score("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert consensus_score("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert consensus_score("5", refs) == 0.0
    assert consensus_score("2", ["2"]) == 1.0  # a single reference: exact match


def test_several_references_exact_match_takes_the_most_common():
    s = vqa_accuracy(["Two", "three", "4"], [["2"] * 3 + ["3"] * 7, ["2"] * 3 + ["3"] * 7, ["4"]], ["n", "n", "m"])
    assert s.correct == [False, True, True]
    assert s.consensus == pytest.approx((0.9 + 1.0 + 1.0) / 3)
    assert s.consensus_per_type == pytest.approx({"m": 1.0, "n": 0.95})


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="one prediction per question"):
        vqa_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="one question type per question"):
        vqa_accuracy(["a"], ["a"], ["t", "u"])


class FakeAnswerer:
    """Answers colour and shape questions right (in its own words), everything else with "maybe"."""

    name = "fake-answerer"

    def __init__(self, world, scenes):
        self.truth = {}
        for i in range(scenes):
            s = world.sample("test", i)
            for qa in s.questions:
                self.truth[np.asarray(s.image).tobytes(), qa.question] = qa
        self.batches = []

    def answer(self, images, questions, **options):
        self.batches.append(len(questions))
        out = []
        for im, q in zip(images, questions):
            qa = self.truth[np.asarray(im).tobytes(), q]
            out.append(f"The {qa.answer.upper()}." if qa.type in ("colour", "shape") else "maybe")
        return out


def test_evaluate_answerer_report_and_plots(tmp_path):
    world, n = ShapesWorld(), 20
    model = FakeAnswerer(world, 10)
    rep = evaluate_answerer(model, "shapes", n=n, out=tmp_path, batch_size=8)
    assert model.batches == [8, 8, 4] and rep["n"] == n
    asked = [qa for i in range(10) for qa in world.sample("test", i).questions][:n]
    types = Counter(qa.type for qa in asked)
    right = types["colour"] + types["shape"]
    m = rep["metrics"]
    assert m["accuracy"] == pytest.approx(right / n)
    assert m["per_type"] == {t: (1.0 if t in ("colour", "shape") else 0.0) for t in sorted(types)}
    assert rep["questions_per_type"] == dict(sorted(types.items()))
    assert [q["question"] for q in rep["per_question"]] == [qa.question for qa in asked]
    assert json.loads((tmp_path / "vqa.json").read_text())["metrics"] == m
    for p in rep["plots"].values():
        assert open(p, "rb").read(4) == b"\x89PNG"
    assert any("colour 1.000" in line for line in summary_lines(rep))


def test_a_shapesworld_export_gives_the_same_numbers_as_the_stream(tmp_path):
    world = ShapesWorld()
    export_shapes(world, tmp_path, {"test": 4}, zeroshot_per_class=0, progress=False)
    n = sum(len(world.sample("test", i).questions) for i in range(4))
    a = evaluate_answerer(FakeAnswerer(world, 4), "shapes", n=n)
    b = evaluate_answerer(FakeAnswerer(world, 4), str(tmp_path), n=0)
    assert b["n"] == a["n"] == n
    assert b["metrics"] == a["metrics"]
