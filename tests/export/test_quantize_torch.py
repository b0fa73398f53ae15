"""``mmfusion quantize`` of a native checkpoint in torch: the same gate as the ONNX path (refuses past the limit,
writing nothing; keeps the model within it with its report), and a kept checkpoint loads as the int8 model the
gate measured."""

from __future__ import annotations

import json

import torch

import mmfusion
from mmfusion.data.shapes import ShapesWorld
from mmfusion.export.quantize import REPORT_JSON, REPORT_PNG
from tests.export.test_quantize import leftovers, quantize


def test_a_native_checkpoint_is_kept_as_int8_with_its_report(tiny, tmp_path, capsys):
    ckpt, _ = tiny
    out = tmp_path / "int8"
    assert quantize(ckpt, out, "--max-drop", "1", "--zeroshot-per-class", "2") == 0  # auto: a checkpoint -> torch
    assert "kept" in capsys.readouterr().out
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["runtime"] == "torch" and report["gate"]["passed"] and "zeroshot_top1" in report["gate"]["drops"]
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG" and leftovers(tmp_path) == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantize"] == "int8" and cfg["quantized_from"]["path"] == str(ckpt.resolve())

    kept, fp32 = mmfusion.load(out), mmfusion.load(ckpt)
    on_load = mmfusion.load(ckpt, quantize="int8")
    assert kept.precision == "int8-dynamic-torch" and kept.fingerprint == on_load.fingerprint
    assert kept.fingerprint != mmfusion.backends.model_fingerprint(fp32)
    images = [ShapesWorld().sample("test", i).image for i in range(4)]
    with torch.no_grad():
        got, want = kept.encode_image(images), on_load.encode_image(images)
        assert torch.equal(got, want)  # every load quantises alike: what runs is what was measured
        assert float((got * fp32.encode_image(images)).sum(-1).min()) > 0.99
    assert quantize(out, tmp_path / "again") == 2
    assert "already int8; quantise the fp32 checkpoint" in capsys.readouterr().err


def test_torch_int8_refuses_past_the_limit_and_writes_nothing(tiny, tmp_path, capsys):
    ckpt, _ = tiny
    report = tmp_path / "report.json"
    assert quantize(ckpt, tmp_path / "q", "--runtime", "torch", "--max-drop", "-0.01", "--report", str(report)) == 1
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []
    assert json.loads(report.read_text())["gate"]["passed"] is False


def test_torch_runtime_names_the_fix_for_what_it_does_not_do(tiny, tmp_path, capsys):
    ckpt, export = tiny
    assert quantize(ckpt, tmp_path / "s", "--mode", "static") == 2
    assert f"export the model first (mmfusion export onnx --model {ckpt}" in capsys.readouterr().err
    assert quantize(ckpt, ckpt) == 2
    assert "--out must differ from --model" in capsys.readouterr().err
    assert quantize(export, tmp_path / "e", "--runtime", "torch") == 2
    assert "not an mmfusion checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and leftovers(tmp_path) == []
