"""CLIP and SigLIP through mmfusion's Embedder: same numbers as transformers, named and found the same way."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmfusion
from mmfusion.backends.hf import HFEmbedder, ModelNotFoundError, hf_source, resolve_device
from mmfusion.interfaces import Embedder
from tests.backends.tiny_hf import tiny_clip, tiny_siglip
from tests.utils import photo

transformers = pytest.importorskip("transformers")

TEXTS = ["a red circle", "a dog on the beach", "two small blue squares left of a star", "sunset"]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def model_dir(request, tmp_path_factory):
    make = tiny_clip if request.param == "clip" else tiny_siglip
    return make(tmp_path_factory.mktemp(request.param) / "model")


def _images(n=5):
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (64, 32), (33, 33), (80, 120), (50, 41)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 5], 3), dtype=np.uint8)) for i in range(n)]


def _direct(model_dir):
    """What a user calling transformers directly gets."""
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    proc = transformers.AutoProcessor.from_pretrained(model_dir)
    return model, proc


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_names_load_the_adapter(model_dir):
    for spec in (str(model_dir), f"hf:{model_dir}"):
        emb = mmfusion.load(spec)
        assert isinstance(emb, HFEmbedder) and isinstance(emb, Embedder)
        assert emb.name == f"hf:{model_dir}" and emb.input_size == 32
    assert hf_source(f"hf:{model_dir}") == str(model_dir)
    assert hf_source("hf:openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


def test_embeddings_equal_transformers(model_dir):
    emb = mmfusion.load(model_dir)
    model, proc = _direct(model_dir)
    images = _images()
    with torch.no_grad():
        pix = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
        ref_i = F.normalize(_features(model.get_image_features(pixel_values=pix)), dim=-1)
        text_kw = {"padding": "max_length"} if model.config.model_type == "siglip" else {"padding": True}
        tok = proc.tokenizer(TEXTS, return_tensors="pt", **text_kw)
        ref_t = F.normalize(_features(model.get_text_features(**tok)), dim=-1)
        out = model(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"), pixel_values=pix)
    emb.batch_size = 2  # batching must not change anything
    zi, zt = emb.encode_image(images), emb.encode_text(TEXTS)
    assert zi.shape == (5, emb.embed_dim) and zt.shape == (4, emb.embed_dim)
    torch.testing.assert_close(zi, ref_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(zt, ref_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.encode_image(emb.preprocess(images)), zi, atol=1e-6, rtol=0)
    assert torch.allclose(emb.encode_image(images, normalize=False).norm(dim=-1), zi.norm(dim=-1)) is False
    # scores: the model's own logits; CLIP a softmax over texts, SigLIP an independent sigmoid per pair
    torch.testing.assert_close(emb.logits(zi, zt), out.logits_per_image, atol=1e-4, rtol=0)
    p = emb.probabilities(zi, zt)
    if emb.model_type == "clip":
        torch.testing.assert_close(p.sum(-1), torch.ones(5))
    else:
        torch.testing.assert_close(p, torch.sigmoid(out.logits_per_image), atol=1e-5, rtol=0)


def test_int8_agrees_with_fp32(model_dir):
    fp32 = mmfusion.load(model_dir)
    q = mmfusion.load(model_dir, quantize="int8")
    assert q.fingerprint == fp32.fingerprint  # the same weights; precision is a loading choice
    assert any("quantized" in type(m).__module__ for m in q.modules())
    images = _images()
    cos_i = (q.encode_image(images) * fp32.encode_image(images)).sum(-1)
    cos_t = (q.encode_text(TEXTS) * fp32.encode_text(TEXTS)).sum(-1)
    assert cos_i.min() > 0.98 and cos_t.min() > 0.98, (cos_i, cos_t)
    agree = q.int8_agreement  # measured at load on generated probes, and logged
    assert set(agree) == {"image_cosine_min", "text_cosine_min"} and min(agree.values()) > 0.98
    assert fp32.int8_agreement is None


def test_a_hub_id_is_read_from_the_cache_offline(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snap)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = mmfusion.load("hf:someone/tiny")
    assert emb.name == "hf:someone/tiny"
    ref = mmfusion.load(model_dir)
    assert emb.fingerprint == ref.fingerprint
    torch.testing.assert_close(emb.encode_text(TEXTS), ref.encode_text(TEXTS))
    with pytest.raises(ModelNotFoundError) as e:
        mmfusion.load("hf:someone/missing")
    msg = str(e.value)
    assert "someone/missing" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg and "download" in msg


def test_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        mmfusion.load("hf:./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        mmfusion.load(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="hf:"):
        mmfusion.load("hf:")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not supported.*clip"):
        mmfusion.load(tmp_path / "bert")


def test_quantize_choices_are_checked(model_dir):
    with pytest.raises(ValueError, match="CUDA GPU|int8"):
        mmfusion.load(model_dir, device="cpu", quantize="4bit")
    with pytest.raises(ValueError, match="unknown quantisation"):
        mmfusion.load(model_dir, quantize="3bit")
    with pytest.raises(ValueError, match="dtype"):
        mmfusion.load(model_dir, dtype="fp8")


def test_bfloat16_on_cpu_runs_close_to_fp32(model_dir):
    bf = mmfusion.load(model_dir, dtype="bf16")
    assert bf.dtype == torch.bfloat16
    images = _images(3)
    cos = (bf.encode_image(images) * mmfusion.load(model_dir).encode_image(images)).sum(-1)
    assert cos.min() > 0.97


def test_the_index_runs_on_a_pretrained_model(model_dir, tmp_path):
    from mmfusion.index import Index

    for i in range(6):
        photo(tmp_path / "photos" / f"{i}.jpg", (300, 200), seed=i)
    spec = f"hf:{model_dir}"
    with Index.open(tmp_path / "db", model=spec, write=True) as ix:
        report = ix.update([tmp_path / "photos"], progress=False)
        assert report.added == 6
    with Index.open(tmp_path / "db") as ix:  # reopened from the recorded name, weights checked
        hits = ix.search(text="a red circle", k=6)
        emb = ix.model
        z = emb.encode_text(["a red circle"])[0].numpy()
        # the index decoded the JPEGs at reduced scale; the vectors stay those of the full images within noise
        full = emb.encode_image([str(h.path) for h in hits]).numpy()
        np.testing.assert_allclose([h.score for h in hits], full @ z, atol=0.02)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_the_evaluators_take_a_pretrained_model(model_dir, tmp_path, capsys):
    from mmfusion.cli.main import main

    rc = main(["-q", "eval", "all", "--model", f"hf:{model_dir}", "--n", "20", "--per-class", "1",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "zeroshot.json").read_text())
    assert report["model"] == f"hf:{model_dir}"
    retrieval = json.loads((tmp_path / "retrieval.json").read_text())
    assert retrieval["n_images"] == 20 and 0 <= retrieval["metrics"]["i2t_R@10"] <= 1
    assert "R@" in capsys.readouterr().out
