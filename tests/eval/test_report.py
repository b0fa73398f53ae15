"""Evaluations end to end on a tiny model: reports, plots, and folder == stream."""

import json

import pytest
import torch

import mmfusion
from mmfusion.data.export import export_shapes
from mmfusion.data.shapes import MISS_REASONS, ShapesWorld
from mmfusion.eval.plots import plot_training_curves
from mmfusion.eval.report import evaluate_retrieval, evaluate_zeroshot, summary_lines, write_report
from tests.utils import TINY_MODEL, shapes_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmfusion.create_model("clip-tiny", tokenizer=shapes_tokenizer(), **TINY_MODEL).eval()


def test_retrieval_report_and_plots(model, tmp_path):
    rep = evaluate_retrieval(model, "shapes", n=24, out=tmp_path, progress=False)
    m = rep["metrics"]
    for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@10", "i2t_mean_rank", "semantic_P@1", "semantic_P@10"):
        assert 0 <= m[k] <= 24 * 5, k
    assert m["i2t_R@1"] <= m["i2t_R@5"] <= m["i2t_R@10"]
    assert rep["n_images"] == 24 and rep["n_texts"] >= 24 * 3
    for p in rep["plots"].values():
        assert p.endswith(".png") and open(p, "rb").read(4) == b"\x89PNG"
    write_report(rep, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == m
    assert any("semantic" in line for line in summary_lines(rep))
    kinds = rep["by_caption_kind"]
    assert set(kinds["semantic_P@1"]) <= {"single", "region", "list", "relation", "count"}
    assert sum(kinds["texts"].values()) == rep["n_texts"]
    for kind, n in kinds["texts"].items():  # every caption whose top-1 image is false has one reason
        misses = kinds["top1_misses"].get(kind, {})
        assert set(misses) <= set(MISS_REASONS)
        assert sum(misses.values()) == round(n * (1 - kinds["semantic_P@1"][kind]))


def test_zeroshot_report_ranks_all_classes(model, tmp_path):
    rep = evaluate_zeroshot(model, "shapes", per_class=2, out=tmp_path, progress=False)
    assert len(rep["classes"]) == 48
    assert set(rep["groups"]) == {"seen", "heldout"}
    assert rep["groups"]["heldout"]["n"] == 2 * 8 and rep["groups"]["seen"]["n"] == 2 * 40
    assert {"top1", "top5", "colour_acc", "shape_acc", "top1_single_template"} <= rep["groups"]["seen"].keys()
    assert (tmp_path / "zeroshot_confusion.png").is_file()


def test_folder_export_gives_the_same_numbers_as_the_stream(model, tmp_path):
    export_shapes(ShapesWorld(), tmp_path, {"test": 20}, zeroshot_per_class=2, progress=False)
    a = evaluate_retrieval(model, "shapes", n=20, progress=False)["metrics"]
    b = evaluate_retrieval(model, str(tmp_path), n=20, progress=False)["metrics"]
    assert a == pytest.approx(b)
    za = evaluate_zeroshot(model, "shapes", per_class=2, progress=False)["groups"]
    zb = evaluate_zeroshot(model, str(tmp_path), per_class=2, progress=False)["groups"]
    assert za["seen"]["top1"] == pytest.approx(zb["seen"]["top1"])
    assert za["heldout"]["top5"] == pytest.approx(zb["heldout"]["top5"])


def test_training_curves_plot(tmp_path):
    rows = [
        {"step": s, "loss": 5 - s / 10, "i2t_acc": s / 30, "t2i_acc": s / 40, "lr": 1e-3, "temperature": 0.07}
        for s in range(1, 31)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "p.png")
    assert out.stat().st_size > 10_000
