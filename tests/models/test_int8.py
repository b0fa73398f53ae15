"""Dynamic int8 of native models in torch: close to fp32, a different identity, CPU only, and the pooled text
path (which splits the fused QKV weight) works on packed int8 weights."""

from __future__ import annotations

import pytest
import torch

import mmfusion
from mmfusion.backends import model_fingerprint
from mmfusion.data.shapes import ShapesWorld
from mmfusion.models import create_model, save_model
from tests.utils import shapes_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("int8") / "clip"
    save_model(create_model("clip-tiny", shapes_tokenizer(context_length=32, vocab_size=512, scenes=30)), path)
    return path


def test_native_int8_is_close_to_fp32_and_named_apart(ckpt):
    fp32, int8 = mmfusion.load(ckpt), mmfusion.load(ckpt, quantize="int8")
    linears = [m for m in int8.modules() if type(m).__name__ == "Linear"]
    assert linears and all(m.__module__.startswith("torch.ao.nn.quantized") for m in linears)
    assert int8.precision == "int8-dynamic-torch" and int8.fingerprint != model_fingerprint(fp32)
    images = [ShapesWorld().sample("test", i).image for i in range(6)]
    texts = [c.text for i in range(6) for c in ShapesWorld().sample("test", i).captions]
    with torch.no_grad():
        pairs = [(fp32.encode_image(images), int8.encode_image(images))]
        pairs.append((fp32.encode_text(texts), int8.encode_text(texts)))
        for a, b in pairs:
            cos = (a * b).sum(-1)
            assert cos.min() > 0.98 and not torch.equal(a, b)  # quantised, and still the same model


def test_pooled_text_equals_the_full_stack_on_int8_weights(ckpt):
    """forward_pooled's last block projects only the pooled token's query; with packed int8 weights it takes the
    generic path, which must still agree with running the whole block stack (up to the activation scale, which
    dynamic int8 takes from the rows of each call)."""
    int8 = mmfusion.load(ckpt, quantize="int8")
    tower = int8.text.transformer
    x = torch.randn(3, 7, tower.blocks[0].ln1.normalized_shape[0])
    index = torch.tensor([6, 2, 4])
    with torch.no_grad():
        full = tower(x, causal=True)[torch.arange(3), index]
        pooled = tower.forward_pooled(x, index, causal=True)
    assert torch.nn.functional.cosine_similarity(pooled, full).min() > 0.999


def test_int8_options_name_the_fix(ckpt):
    with pytest.raises(ValueError, match="native models take int8"):
        mmfusion.load(ckpt, quantize="4bit")
    with pytest.raises(ValueError, match="runs on CPU"):
        mmfusion.load(ckpt, quantize="int8", device="cuda")
    with pytest.raises(ValueError, match="apply to Hugging Face models only"):
        mmfusion.load(ckpt, dtype="fp16")
