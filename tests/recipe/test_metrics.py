"""A step's headline numbers: an evaluation's are those its model card shows (one table), named for the summary."""

import json

from mmfusion.recipe.metrics import report_metrics, step_metrics


def test_an_eval_steps_metrics_are_the_cards_figures(tmp_path):
    reports = {
        "retrieval": {"task": "retrieval", "n_images": 8, "metrics": {"i2t_R@1": 0.5, "t2i_R@1": 0.25}},
        "zeroshot": {"task": "zeroshot", "groups": {"seen": {"top1": 0.75, "n": 8}}},
        "caption": {"task": "caption", "n": 8, "metrics": {"CIDEr": 1.5, "attribute_accuracy": 0.875}},
        "vqa": {"task": "vqa", "n": 8, "metrics": {"accuracy": 0.5, "per_type": {"colour": 1.0}}},
        "composition": {"task": "composition", "mean": {"i2t": 0.625}},
        "broken": {"task": "retrieval", "metrics": ["not", "a", "mapping"]},
    }
    for name, report in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    (tmp_path / "summary.json").write_text("[]")
    assert step_metrics("eval", tmp_path) == {
        "i2t R@1": 0.5, "t2i R@1": 0.25, "zero-shot top1 seen": 0.75, "CIDEr": 1.5, "attribute accuracy": 0.875,
        "VQA accuracy": 0.5, "VQA accuracy colour": 1.0, "composition i2t": 0.625,
    }  # fmt: skip
    assert report_metrics([1]) == {} and report_metrics({"task": "other", "metrics": {"x": 1.0}}) == {}


def test_a_trainings_metrics_are_its_last_whole_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 2.0}\n{"step": 8, "loss": 1.0}\n{"step": 1')
    assert step_metrics("train", tmp_path) == {"step": 8, "loss": 1.0}
