"""Model cards read from a run directory: what the page shows beside each served model."""

import json

import pytest

from mmfusion.eval.card import card_curve, headline_metrics, model_card
from mmfusion.models.checkpoint import save_model
from mmfusion.models.clip import CLIPConfig
from mmfusion.models.registry import build_model
from mmfusion.modules.encoders import TextConfig, VisionConfig


@pytest.fixture
def run(tmp_path):
    """A training run as `mmfusion train` leaves it: model/, metrics.jsonl (its last line cut by a crash), eval/."""
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    cfg = CLIPConfig(embed_dim=16, vision=vision, text=TextConfig(vocab_size=64, context_length=8, width=32,
                                                                  layers=1, heads=2))  # fmt: skip
    model = build_model("clip", cfg, None, name="clip-mini")
    model.meta = {"trained_on": {"source": "shapes"}}
    save_model(model, tmp_path / "model")
    rows = [{"step": 10, "elapsed_s": 1.5, "loss": 2.0}, {"step": 20, "samples": 640, "elapsed_s": 3.25, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')
    (tmp_path / "eval").mkdir()
    retrieval = {"task": "retrieval", "n_images": 24, "metrics": {"i2t_R@1": 0.5, "i2t_R@10": 0.9, "t2i_R@10": 0.8}}
    (tmp_path / "eval" / "retrieval.json").write_text(json.dumps(retrieval))
    (tmp_path / "eval" / "broken.json").write_text("{not json")
    return tmp_path, sum(p.numel() for p in model.parameters())


def test_card_of_a_run_has_its_family_size_training_and_figures(run):
    path, params = run
    card = model_card(str(path), "embedder")
    assert card["family"] == "clip" and card["name"] == "clip-mini" and card["trained_on"] == "shapes"
    assert card["parameters"] == params  # read from the safetensors header alone
    assert card["training"] == {"step": 20, "samples": 640, "elapsed_s": 3.25, "loss": 1.5}  # the cut line skipped
    assert card["metrics"] == [{"task": "retrieval", "n": 24, "i2t_R@1": 0.5, "i2t_R@10": 0.9, "t2i_R@10": 0.8}]
    assert card["curve"] is False and card_curve(str(path)) is None
    (path / "plots").mkdir()
    (path / "plots" / "training.png").write_bytes(b"\x89PNG")
    assert card_curve(str(path / "model")) == path / "plots" / "training.png"  # the checkpoint finds its run


def test_pretrained_and_missing_models(tmp_path):
    assert model_card(None, "captioner") is None
    card = model_card("hf:Salesforce/blip-image-captioning-base", "captioner")
    assert card["family"] == "pretrained" and "metrics" not in card and card_curve("hf:x/y") is None
    gone = model_card(str(tmp_path / "runs" / "clip"), "embedder")  # a run moved or deleted: not a pretrained model
    assert gone["family"] == "missing" and "does not exist" in gone["what"] and "Hugging Face" not in gone["what"]
    assert card_curve(str(tmp_path / "runs" / "clip")) is None


MALFORMED = [
    [1, 2],
    {"task": "retrieval", "metrics": [0.5]},
    {"task": "retrieval", "metrics": {"i2t_R@1": "high", "t2i_R@1": None, "i2t_R@10": True}},
    {"task": "zeroshot", "groups": ["seen"]},
    {"task": "zeroshot", "groups": {"seen": 0.5, "heldout": {"top1": "x", "n": "many"}}},
    {"task": "vqa", "metrics": {"accuracy": "0.8", "per_type": [0.9]}},
    {"task": ["vqa"], "metrics": {"accuracy": 0.8, "per_type": "colour"}},
    {"task": "composition", "mean": "0.5"},
    {"metrics": {"CIDEr": float("nan")}},
]


@pytest.mark.parametrize("report", MALFORMED)
def test_a_report_of_an_unexpected_shape_has_no_headline(report):
    head = headline_metrics(report)
    assert all(isinstance(v, float) for k, v in head.items() if k not in ("task", "n"))  # never a raise, nor a string
    assert head in ({}, {"task": "vqa", "n": None, "accuracy": 0.8})


def test_a_card_passes_over_malformed_reports_and_files(run):
    path, _ = run
    for i, report in enumerate(MALFORMED):
        (path / "eval" / f"bad{i}.json").write_text(json.dumps(report))
    (path / "model" / "config.json").write_text(
        json.dumps({**json.loads((path / "model" / "config.json").read_text()), "trained_on": "shapes", "config": 3})
    )
    (path / "metrics.jsonl").write_text('{"step": "ten", "loss": 1.5}\n')
    card = model_card(str(path), "embedder")  # what GET /models answers: no 500 for a folder's odd files
    assert card["family"] == "clip" and "trained_on" not in card and card["training"] == {"loss": 1.5}
    retrieval = {"task": "retrieval", "n": 24, "i2t_R@1": 0.5, "i2t_R@10": 0.9, "t2i_R@10": 0.8}
    assert retrieval in card["metrics"] and all(m.get("task") in ("retrieval", "vqa") for m in card["metrics"])


def test_headline_metrics_of_each_report_kind():
    caption = {"task": "captioning", "n": 50, "metrics": {"attribute_accuracy": 0.9, "CIDEr": 4.1, "BLEU-4": 0.8}}
    assert headline_metrics(caption) == {"task": "caption", "n": 50, "attribute_accuracy": 0.9, "CIDEr": 4.1,
                                         "BLEU-4": 0.8}  # fmt: skip
    vqa = {"task": "vqa", "n": 400, "metrics": {"accuracy": 0.85, "per_type": {"colour": 0.9}}}
    assert headline_metrics(vqa) == {"task": "vqa", "n": 400, "accuracy": 0.85, "accuracy_colour": 0.9}
    zs = {"task": "zeroshot", "groups": {"seen": {"top1": 0.5, "top5": 0.9, "n": 40}, "heldout": {"top1": 0.1, "n": 8}}}
    assert headline_metrics(zs) == {"task": "zeroshot", "n": 48, "top1_seen": 0.5, "top5_seen": 0.9,
                                    "top1_heldout": 0.1}  # fmt: skip
    composition = {"task": "composition", "mean": {"i2t": 0.75, "t2i": 0.625}, "types": {}}
    assert headline_metrics(composition) == {"task": "composition", "n": None, "composition_i2t": 0.75,
                                             "composition_t2i": 0.625}  # fmt: skip
    fusion = {"task": "fusion", "n": 10, "metrics": {"accuracy": 0.5, "macro_f1": 0.25, "balanced_accuracy": 0.5}}
    assert headline_metrics(fusion) == {"task": "fusion", "n": 10, "accuracy": 0.5, "macro_f1": 0.25}
    assert headline_metrics({"task": "other", "metrics": {"f1": 1.0}}) == {}


def test_a_bare_name_is_a_model_given_in_code_not_a_missing_folder(tmp_path):
    assert model_card("colour-histogram", "embedder")["family"] == "other"
    assert model_card(str(tmp_path / "gone"), "embedder")["family"] == "missing"
