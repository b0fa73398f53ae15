"""The compositional benchmark: 1.0 for the truth, 0.5 for chance, 0.0 for the opposite, and the command."""

import json
import math

import numpy as np
import pytest

from mmfusion.cli.main import main
from mmfusion.data.negatives import NEGATIVE_TYPES, TEXT_TYPES
from mmfusion.eval.composition import (
    CompositionSet,
    OracleScorer,
    RandomScorer,
    composition_report,
    evaluate_composition,
    folder_set,
    score_items,
    shapes_set,
    summary_lines,
)
from tests.utils import tiny_clip, write_png

SWAPS = ("swap_colour", "swap_shape", "swap_relation")


@pytest.fixture(scope="module")
def bench() -> CompositionSet:
    return shapes_set(600, "test", seed=0)


class AntiOracle(OracleScorer):
    def score(self, data, pairs):
        return 1 - super().score(data, pairs)


class Constant:
    def score(self, data, pairs):
        return np.zeros(len(pairs))


def _report(scorer, data):
    return composition_report(data, score_items(scorer, data), type(scorer).__name__)


def test_oracle_scores_one_on_every_type_both_ways(bench):
    rep = _report(OracleScorer(), bench)
    assert set(rep["types"]) == set(NEGATIVE_TYPES)
    for kind, t in rep["types"].items():
        for d in ("i2t", "t2i"):
            assert t[d]["accuracy"] == 1.0 and t[d]["n"] >= 50, (kind, d)
    assert rep["mean"] == {"i2t": 1.0, "t2i": 1.0}


def test_random_scores_chance_on_binary_swaps(bench):
    rep = _report(RandomScorer(seed=1), bench)
    pooled = []
    for kind in SWAPS:
        for d in ("i2t", "t2i"):
            cell = rep["types"][kind][d]
            assert cell["chance"] == 0.5
            assert abs(cell["accuracy"] - 0.5) < 4 * math.sqrt(0.25 / cell["n"]), (kind, d, cell)
            pooled.append((cell["accuracy"], cell["n"]))
    n = sum(k for _, k in pooled)
    assert n > 1200
    assert abs(sum(a * k for a, k in pooled) / n - 0.5) < 0.04


def test_the_benchmark_can_fail(bench):
    """The opposite of the truth scores 0, and a scorer that cannot tell (ties) scores exactly chance."""
    assert _report(AntiOracle(), bench)["mean"] == {"i2t": 0.0, "t2i": 0.0}
    rep = _report(Constant(), bench)
    assert all(t[d]["accuracy"] == 0.5 for t in rep["types"].values() for d in ("i2t", "t2i"))


def test_same_seed_same_tests():
    a, b = shapes_set(40, seed=3), shapes_set(40, seed=3)
    assert a.items == b.items and a.texts == b.texts
    assert shapes_set(40, seed=4).texts != a.texts


def test_heldout_split_and_report_lines():
    rep = evaluate_composition(OracleScorer(), n=60, split="heldout", progress=False)
    assert "heldout" in rep["data"] and rep["mean"]["i2t"] == 1.0
    lines = summary_lines(rep)
    assert any(line.strip().startswith("swap_colour") for line in lines)
    assert rep["examples"]["swap_colour"]["i2t"]


def _folder(root):
    captions = [
        ("a.png", "a red circle to the left of a blue square"),
        ("a.png", "two circles"),
        ("b.png", "the green star is above the white cross"),
        ("c.png", "a photo of a dog"),
    ]
    for name, _ in captions:
        write_png(root / name, (32, 32))
    (root / "captions.jsonl").write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in captions))
    return root


def test_folder_makes_word_swaps_image_to_text_only(tmp_path):
    data = folder_set(str(_folder(tmp_path)), 0)
    assert {it.direction for it in data.items} == {"i2t"} and not data.checked
    assert {it.kind for it in data.items} <= set(TEXT_TYPES)
    assert {it.kind for it in data.items} >= set(SWAPS)
    assert all(it.true[0] == it.false[0] < 2 for it in data.items)  # the dog has nothing to swap
    with pytest.raises(ValueError, match="oracle needs scenes"):
        score_items(OracleScorer(), data)


def test_command_on_a_tiny_model(tmp_path, capsys):
    model = tiny_clip(tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["-q", "eval", "composition", "--model", str(model), "--n", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "swap_colour" in printed and "mean of types" in printed
    rep = json.loads((out / "composition.json").read_text())
    assert rep["task"] == "composition" and rep["chance"] == 0.5
    for t in rep["types"].values():
        for d in ("i2t", "t2i"):
            if d in t:
                assert 0 <= t[d]["accuracy"] <= 1 and t[d]["n"] > 0
    assert (out / "composition.png").read_bytes()[:4] == b"\x89PNG"


def test_command_on_a_folder(tmp_path, capsys):
    model = tiny_clip(tmp_path / "model")
    folder = _folder(tmp_path / "photos")
    args = ["-q", "eval", "composition", "--model", str(model), "--data", str(folder)]
    assert main([*args, "--json", str(tmp_path / "c.json"), "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    assert set(rep["mean"]) == {"i2t"} and "unchecked" in rep["negatives"]
    assert (tmp_path / "out" / "composition.png").is_file()
    assert "swap_relation" in capsys.readouterr().out
