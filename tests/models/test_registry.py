"""Every registered preset at tiny size: shapes, no NaN, save/load round trip (one smoke test for all)."""

import json

import pytest
import torch

import mmfusion
from mmfusion.config import ConfigError
from mmfusion.models.registry import model_config
from tests.utils import random_image, shapes_tokenizer

SHRINK = {"vision": {"layers": 1}, "text": {"layers": 1, "vocab_size": 512, "context_length": 24}}


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


@pytest.mark.parametrize("name", mmfusion.list_models("clip-*") + mmfusion.list_models("vit-*"))
def test_every_clip_preset_builds_runs_and_round_trips(name, tok, tmp_path):
    torch.manual_seed(0)
    model = mmfusion.create_model(name, tokenizer=tok, **SHRINK).eval()
    size = model.cfg.vision.image_size
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size), tok.encode(["a red circle", "two shapes"]))
    assert out.image_embeds.shape == out.text_embeds.shape == (2, model.embed_dim)
    assert torch.isfinite(out.image_embeds).all() and torch.isfinite(out.text_embeds).all()
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    mmfusion.save_model(model, tmp_path / "ckpt")
    again = mmfusion.load(tmp_path / "ckpt")
    imgs = [random_image(40, 1), random_image(40, 2)]
    with torch.no_grad():
        assert torch.equal(model.encode_image(imgs), again.encode_image(imgs))
        assert torch.equal(model.encode_text(["a blue star"]), again.encode_text(["a blue star"]))
        assert torch.equal(model.encode_text("x", normalize=False), again.encode_text("x", normalize=False))
    assert again.cfg == model.cfg and not again.training


def test_vit_b_32_geometry_is_the_papers():
    _, cfg = model_config("vit-b-32")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers) == (224, 32, 768, 12)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.context_length) == (512, 12, 8, 77)
    assert cfg.embed_dim == 512 and cfg.text.vocab_size == 49408


def test_presets_logit_scale_initialisation():
    model = mmfusion.create_model("clip-tiny")
    assert model.logit().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.cfg.max_logit_scale == pytest.approx(4.60517, rel=1e-5)


def test_list_models_pattern_and_errors(tmp_path):
    assert mmfusion.list_models("vit-*") == ["vit-b-32"]
    with pytest.raises(KeyError, match=r"available: .*\bclip-tiny\b"):
        mmfusion.create_model("clip-huge")
    with pytest.raises(ConfigError, match="vision.layerz"):
        mmfusion.create_model("clip-tiny", vision={"layerz": 2})
    with pytest.raises(FileNotFoundError, match="no model at"):
        mmfusion.load(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mmfusion.load(tmp_path / "half")


def test_text_without_tokenizer_is_explained():
    with pytest.raises(RuntimeError, match="no tokenizer"):
        mmfusion.create_model("clip-tiny").encode_text("a red circle")


def test_checkpoint_is_safetensors_and_json(tok, tmp_path):
    mmfusion.save_model(mmfusion.create_model("clip-tiny", tokenizer=tok, **SHRINK), tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["family"] == "clip" and meta["config"]["vision"]["layers"] == 1


@pytest.mark.parametrize("strategy", ["concat", "late", "attention", "cross_attention", "gated", "unified", "lowrank"])
def test_fusion_preset_builds_runs_and_round_trips(strategy, tmp_path):
    torch.manual_seed(0)
    model = mmfusion.create_model(
        "fusion-small", strategy=strategy, modalities=("image", "audio", "text"), feature_dims={"text": 12},
        num_classes=5,
    ).eval()  # fmt: skip
    feats = {"image": torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8), "audio": torch.randn(3, 64, 20),
             "text": torch.randn(3, 12)}  # fmt: skip
    present = {"audio": torch.tensor([True, False, True])}
    with torch.no_grad():
        out = model(feats, present=present)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    mmfusion.save_model(model, tmp_path / "ckpt")
    again = mmfusion.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(out, again(feats, present=present))


def test_every_preset_is_listed_once():
    names = mmfusion.list_models()
    assert "fusion-small" in names and "clip-tiny" in names and len(set(names)) == len(names)
