"""The captioner: a checkpoint like any other, a CLIP image tower to start from, learning from captions."""

import json

import pytest
import torch

import mmfusion
from mmfusion.cli.main import main
from mmfusion.data.shapes import ShapesWorld
from mmfusion.interfaces import Captioner
from mmfusion.models import create_model, save_model
from mmfusion.train import DataConfig, RunConfig, TrainConfig, train
from tests.utils import shapes_tokenizer, tiny_clip

TINY = {
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "vision_embed_dim": 16,
    "decoder": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 1, "heads": 2},
}


@pytest.fixture(scope="module")
def tokenizer():
    return shapes_tokenizer()


@pytest.fixture(scope="module")
def images():
    world = ShapesWorld()
    return [world.sample("test", i).image for i in range(4)]


def test_round_trip_through_a_checkpoint(tmp_path, tokenizer, images):
    torch.manual_seed(0)
    model = create_model("caption-tiny", tokenizer, **TINY).eval()
    save_model(model, tmp_path / "cap")
    loaded = mmfusion.load(tmp_path / "cap")
    assert isinstance(loaded, Captioner) and loaded.family == "captioner"
    assert json.loads((tmp_path / "cap" / "config.json").read_text())["family"] == "captioner"
    assert loaded.generate_ids(images, max_new_tokens=8) == model.generate_ids(images, max_new_tokens=8)
    assert loaded.caption(images, num_beams=3, max_new_tokens=8) == model.caption(images, num_beams=3, max_new_tokens=8)


def test_cache_beams_and_options_on_the_model(tokenizer, images):
    torch.manual_seed(1)
    model = create_model("caption-tiny", tokenizer, **TINY).eval()
    for opts in ({}, {"num_beams": 3}, {"do_sample": True, "temperature": 1.3, "seed": 5}):
        assert model.generate_ids(images, use_cache=False, max_new_tokens=10, **opts) == model.generate_ids(
            images, max_new_tokens=10, **opts)  # fmt: skip
    assert model.generate_ids(images, num_beams=1) == model.generate_ids(images)
    with pytest.raises(ValueError, match="unknown generation option"):
        model.caption(images, beams=2)
    with pytest.raises(ValueError, match="prompt"):
        model.caption(images, prompt="a photo of")


def test_starts_from_a_clip_image_tower_frozen_or_not(tmp_path):
    clip = mmfusion.load(tiny_clip(tmp_path / "clip"))
    cap = mmfusion.models.captioner.CaptionModel.from_clip(mmfusion.load(tmp_path / "clip"), freeze=True)
    for k, v in clip.visual.state_dict().items():
        torch.testing.assert_close(cap.visual.state_dict()[k], v)
    assert cap.tokenizer is not None and cap.cfg.vision == clip.cfg.vision
    assert not any(p.requires_grad for p in cap.visual.parameters())
    assert all(p.requires_grad for p in cap.decoder.parameters())
    images = torch.randn(2, 3, 16, 16)
    tokens = cap.tokenizer.encode(["a red circle", "two blue squares"])
    loss, _ = cap.loss(images, tokens)
    loss.backward()
    assert all(p.grad is None for p in cap.visual.parameters())
    with pytest.raises(ValueError, match="not a CLIP"):
        mmfusion.models.captioner.CaptionModel.from_clip(cap)


def test_training_lowers_the_caption_loss(tmp_path):
    cfg = RunConfig(
        task="caption", preset="caption-tiny", model=TINY, data=DataConfig(tokenizer_captions=200),
        train=TrainConfig(steps=80, batch_size=32, lr=3e-3, warmup_steps=4, log_every=1, save_every=20,
                          progress=False, threads=1),
        out=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert rows[-1]["token_acc"] > 0.3
    model = mmfusion.load(result.out)
    world = ShapesWorld()
    caps = model.caption([world.sample("test", i).image for i in range(3)], max_new_tokens=12)
    assert all(isinstance(c, str) and c for c in caps)


def test_cli_train_caption_on_a_tiny_budget_then_caption_an_image(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["-q", "train", "caption", "--steps", "2", "--out", str(out), "--train.batch_size=4",
            "--train.progress=false", "--data.tokenizer_captions=100"]  # fmt: skip
    args += [f"--model.{k}.{kk}={vv}" for k, v in TINY.items() if isinstance(v, dict) for kk, vv in v.items()]
    args += ["--model.vision_embed_dim=16"]
    assert main(args) == 0
    assert "mmfusion caption --model" in capsys.readouterr().out
    img = tmp_path / "scene.png"
    ShapesWorld().sample("test", 0).image.save(img)
    assert main(["-q", "caption", "--model", str(out), str(img)]) == 0
    assert str(img.name) in capsys.readouterr().out
    assert main(["-q", "eval", "caption", "--model", str(out), "--n", "6", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "captioning.json").read_text())
    assert report["n"] == 6 and "CIDEr" in report["metrics"] and "BLEU-4" in capsys.readouterr().out
    assert main(["-q", "eval", "vqa", "--model", str(out), "--n", "4"]) == 2  # a captioner answers nothing
