"""Pretrained CLIP and SigLIP exported to ONNX: the torch-free runtime re-does their image processors and
tokenizers exactly, embeds as the torch adapter does, and quantises through the same gate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion.backends.ort import OrtHFEmbedder
from mmfusion.cli.main import main
from mmfusion.export import export_onnx
from mmfusion.export.quantize import REPORT_JSON
from tests.export.helpers import BLOCKED, cosines

pytest.importorskip("transformers")
from tests.backends.tiny_hf import tiny_clip, tiny_siglip  # noqa: E402

TEXTS = ["a red circle", "photo of a cat on the beach", "", "A DOG", "two big blue squares left of three people"]


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 31), (31, 77), (97, 33), (20, 20), (300, 200)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_export(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    (tiny_clip if request.param == "clip" else tiny_siglip)(root / "hf")
    export_onnx(f"hf:{root / 'hf'}", root / "onnx")
    return request.param, f"hf:{root / 'hf'}", root / "onnx"


def test_hf_export_equals_the_torch_adapter(hf_export):
    kind, src, export = hf_export
    hf, ort = mmfusion.load(src), mmfusion.load(export)
    assert isinstance(ort, OrtHFEmbedder) and ort.model_type == kind and ort.fingerprint == hf.fingerprint
    images = photos()
    np.testing.assert_array_equal(ort.preprocess(images), hf.preprocess(images).numpy())  # pixel for pixel
    want = hf.tokenizer(TEXTS, return_tensors="np", **hf._text_kwargs)
    got = ort.tokenizer.encode(TEXTS)
    assert set(got) == ({"input_ids", "attention_mask"} if kind == "clip" else {"input_ids"})
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k])
    assert cosines(ort.encode_image(images), hf.encode_image(images)).min() >= 0.9999
    zt, ht = ort.encode_text(TEXTS), hf.encode_text(TEXTS)
    assert cosines(zt, ht).min() >= 0.9999
    np.testing.assert_allclose(ort.probabilities(zt[:2], zt).numpy(), hf.probabilities(ht[:2], ht).numpy(), atol=1e-4)
    with pytest.raises(TypeError, match="takes strings"):
        ort.encode_text(torch.tensor([[1, 2]]))


def test_hf_export_runs_with_torch_blocked(hf_export, tmp_path):
    _, src, export = hf_export
    images = photos()
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    args = [str(export), json.dumps(paths), json.dumps(TEXTS), str(tmp_path / "i.npy"), str(tmp_path / "t.npy")]
    done = subprocess.run([sys.executable, "-c", BLOCKED, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    hf = mmfusion.load(src)
    assert cosines(np.load(tmp_path / "i.npy"), hf.encode_image([Image.open(p) for p in paths])).min() >= 0.9999
    assert cosines(np.load(tmp_path / "t.npy"), hf.encode_text(TEXTS)).min() >= 0.9999


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_hf_export_quantises_through_the_gate(hf_export, tmp_path, mode):
    _, _, export = hf_export
    out = tmp_path / mode
    argv = ["-q", "quantize", "--model", str(export), "--out", str(out), "--mode", mode, "--verify", "shapes",
            "--n", "32", "--calibration-n", "16", "--threads", "1"]  # fmt: skip
    if mode != "static":
        argv = argv[:-4] + argv[-2:]
    assert main([*argv, "--max-drop", "-1"]) == 1 and not out.exists()  # a gain of a whole point: never
    assert main([*argv, "--max-drop", "1"]) == 0
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["gate"]["passed"] and report["gate"]["cosine_to_before"]["images"]["mean"] > 0.98
    assert isinstance(mmfusion.load(out), OrtHFEmbedder)
