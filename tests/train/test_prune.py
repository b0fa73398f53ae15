"""Structured pruning: zero percent changes nothing, a pruned model has the smaller shapes in its config and
weights and loads and runs like any model, importance is deterministic, and the ranking keeps what it must."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.models import create_model, save_model
from mmfusion.train.prune import choose, measure_importance, prune, shapes_batches
from tests.utils import shapes_tokenizer

SMALL = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2.0},
    "text": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2.0},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("clip-tiny", shapes_tokenizer(scenes=50), **SMALL).eval()


@pytest.fixture(scope="module")
def importance(model):
    return measure_importance(model, shapes_batches(model, 2, 16, seed=0))


def inputs(model):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=g), model.tokenizer.encode(
        ["a red circle", "two blue squares", "a star"]
    )


def test_pruning_nothing_changes_nothing(model, importance):
    same, summary = prune(model, importance, heads=0.0, mlp=0.0)
    x, tok = inputs(model)
    with torch.no_grad():
        assert torch.equal(same.encode_image(x), model.encode_image(x))
        assert torch.equal(same.encode_text(tok), model.encode_text(tok))
    assert summary["parameters"]["before"] == summary["parameters"]["after"]


def test_a_pruned_model_is_smaller_and_loads_like_any_model(model, importance, tmp_path):
    small, summary = prune(model, importance, heads=0.5, mlp=0.5)
    v = small.cfg.vision
    assert sum(v.layer_heads) == 4 and all(h >= 1 for h in v.layer_heads)  # half of 2 x 4 heads
    assert all(c % 8 == 0 for c in v.layer_mlp) and 64 - 2 * 7 <= sum(v.layer_mlp) <= 64  # half of 2 x 64, by 8s
    blocks = small.visual.transformer.blocks
    for b, h, c in zip(blocks, v.layer_heads, v.layer_mlp, strict=True):
        assert b.attn.qkv.weight.shape == (3 * h * 8, 32) and b.attn.out.weight.shape == (32, h * 8)
        assert b.mlp.fc1.weight.shape == (c, 32) and b.mlp.fc2.weight.shape == (32, c)
    assert summary["parameters"]["after"] < summary["parameters"]["before"]
    save_model(small, tmp_path / "pruned")
    loaded = mmfusion.load(tmp_path / "pruned")
    assert loaded.cfg.vision.layer_heads == v.layer_heads and loaded.meta["pruned"]["heads"] == 0.5
    x, tok = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), small.encode_image(x))
        torch.testing.assert_close(loaded.encode_text(tok), small.encode_text(tok))
        cos = (small.encode_image(x) * model.encode_image(x)).sum(-1)
    assert cos.min() > 0.0  # still related to the model it came from, and not the same
    assert not torch.equal(small.encode_image(x), model.encode_image(x))


def test_a_pruned_model_exports_to_onnx(model, importance, tmp_path):
    pytest.importorskip("onnxruntime")
    from mmfusion.export import export_onnx

    small, _ = prune(model, importance, heads=0.3, mlp=0.3)
    save_model(small, tmp_path / "pruned")
    export_onnx(tmp_path / "pruned", tmp_path / "onnx")
    ort = mmfusion.load(tmp_path / "onnx")
    x, tok = inputs(model)
    with torch.no_grad():
        want = small.encode_image(x)
    got = torch.as_tensor(np.asarray(ort.encode_image(x)))
    assert (got * want).sum(-1).min() > 0.9999


def test_importance_is_deterministic_and_follows_the_data(model, importance):
    again = measure_importance(model, shapes_batches(model, 2, 16, seed=0))
    for t in ("image", "text"):
        for a, b in zip(importance.heads[t], again.heads[t], strict=True):
            np.testing.assert_array_equal(a, b)
    other = measure_importance(model, shapes_batches(model, 2, 16, seed=5))
    assert any(not np.array_equal(a, b) for a, b in zip(importance.mlp["image"], other.mlp["image"], strict=True))
    assert all((a >= 0).all() for a in importance.heads["image"])


def test_choose_drops_the_least_important_and_keeps_the_minimum():
    scores = [np.array([0.9, 0.1, 0.5, 0.6]), np.array([0.01, 0.02, 0.03, 0.04])]
    kept = choose(scores, 0.5, [1, 1])
    # per-block L2 normalisation: the second block's smallest are small only relative to its own norm
    assert sum(len(k) for k in kept) == 4 and all(len(k) >= 1 for k in kept)
    assert 0 in kept[0] and 1 not in kept[0]
    kept = choose(scores, 0.9, [1, 2])
    assert [len(k) for k in kept] == [1, 2]  # the minimum caps what goes, even past the ratio
    with pytest.raises(ValueError, match="fraction"):
        choose(scores, 1.0, [1, 1])
    wide = [np.linspace(1.0, 2.0, 20), np.linspace(1.0, 2.0, 20)]
    kept = choose(wide, 0.3, [2, 2], multiple=8)  # 28 of 40 kept by the ratio, then 16 + 8 or so by eights
    assert all(len(k) % 8 == 0 for k in kept) and sum(len(k) for k in kept) <= 28
    assert all(k[-1] == 19 for k in kept)  # the most important stay
    assert [len(k) for k in choose([np.ones(3)], 0.0, [2], multiple=8)] == [2]  # rounding stops at the minimum
