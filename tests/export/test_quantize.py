"""``mmfusion export onnx`` and ``mmfusion quantize``: the gate that refuses a model that lost too much, writing
nothing, and keeps one within the limit with its report; errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmfusion
from mmfusion.backends.ort import EXPORT_FILE, IMAGE_FILE, TEXT_FILE, OrtEmbedder
from mmfusion.cli.main import main
from mmfusion.export import verify
from mmfusion.export.quantize import REPORT_JSON, REPORT_PNG


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def quantize(model: Path, out: Path, *extra: str) -> int:
    return main(["-q", "quantize", "--model", str(model), "--out", str(out), "--verify", "shapes", "--n", "48",
                 "--threads", "1", *extra])  # fmt: skip


def test_export_command_writes_a_checked_export(tiny, tmp_path, capsys):
    ckpt, _ = tiny
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(tmp_path / "x")]) == 0
    assert "checked by onnx.checker" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "x" / EXPORT_FILE).read_text())
    assert cfg["precision"] == "fp32" and cfg["image"]["size"] == 16 and cfg["text"]["context_length"] == 24
    assert cfg["embed_dim"] == 16 and cfg["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)
    assert {p.name for p in (tmp_path / "x").iterdir()} == {EXPORT_FILE, IMAGE_FILE, TEXT_FILE, "tokenizer.json"}
    assert leftovers(tmp_path) == []
    # again over the old export: replaced whole
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(tmp_path / "x")]) == 0
    assert isinstance(mmfusion.load(tmp_path / "x"), OrtEmbedder) and leftovers(tmp_path) == []


def test_export_of_a_preset_has_no_tokenizer(tmp_path):
    assert main(["-q", "export", "onnx", "--model", "clip-tiny", "--out", str(tmp_path / "p")]) == 0
    ort = mmfusion.load(tmp_path / "p")
    assert ort.encode_image([__import__("PIL").Image.new("RGB", (64, 64))]).shape == (1, 128)
    with pytest.raises(RuntimeError, match="without a tokenizer.*export a trained run"):
        ort.encode_text(["a red circle"])
    assert ort.encode_text(torch.tensor([[2, 9, 3]])).shape == (1, 128)


def test_quantize_refuses_past_the_limit_and_writes_nothing(tiny, tmp_path, capsys):
    _, export = tiny
    out = tmp_path / "int8"
    report = tmp_path / "ci" / "report.json"
    assert quantize(export, out, "--max-drop", "-0.01", "--report", str(report)) == 1  # no drop is that good
    err = capsys.readouterr().err
    assert "refused" in err and "nothing was written" in err
    assert not out.exists() and leftovers(tmp_path) == []
    gate = json.loads(report.read_text())["gate"]
    assert gate["passed"] is False and gate["failed"] == [k for k, d in gate["drops"].items() if d > -0.01]


def test_quantize_keeps_a_model_within_the_limit_with_its_report(tiny, tmp_path, capsys, monkeypatch):
    ckpt, export = tiny
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "int8"
    assert quantize(export, out, "--max-drop", "1") == 0
    assert "kept" in capsys.readouterr().out
    assert {REPORT_JSON, REPORT_PNG, EXPORT_FILE, IMAGE_FILE, TEXT_FILE} <= {p.name for p in out.iterdir()}
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["gate"]["passed"] and report["mode"] == "dynamic" and report["verify"]["n_images"] == 48
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG" and leftovers(tmp_path) == []
    assert list((tmp_path / "cwd").iterdir()) == []
    q = mmfusion.load(out)
    assert q.precision == "int8-dynamic" and q.fingerprint != mmfusion.load(export).fingerprint
    assert report["gate"]["cosine_to_before"]["images"]["mean"] > 0.99
    assert quantize(out, tmp_path / "again") == 2
    assert "already int8-dynamic; quantise the fp32 export" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["static", "fp16"])
def test_static_and_fp16_pass_the_gate(tiny, tmp_path, mode, monkeypatch):
    _, export = tiny
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # ONNX Runtime's tools have left temporary files in the current folder
    extra = ["--calibration-n", "32", "--per-channel"] if mode == "static" else []
    assert quantize(export, tmp_path / mode, "--mode", mode, "--max-drop", "1", *extra) == 0
    report = json.loads((tmp_path / mode / REPORT_JSON).read_text())
    assert report["mode"] == mode and report["gate"]["cosine_to_before"]["texts"]["mean"] > 0.98
    if mode == "static":
        assert report["calibration"]["images"] == 32 and "ShapesWorld" in report["calibration"]["data"]
    assert mmfusion.load(tmp_path / mode).precision == ("fp16" if mode == "fp16" else "int8-static")
    assert list((tmp_path / "cwd").iterdir()) == []


def test_static_calibrates_on_a_folder(tiny, tmp_path):
    from mmfusion.data.shapes import ShapesWorld

    _, export = tiny
    photos = tmp_path / "photos"
    photos.mkdir()
    world = ShapesWorld()
    for i in range(6):
        world.sample("train", i).image.save(photos / f"{i}.png")
    assert quantize(export, tmp_path / "s", "--mode", "static", "--calibration", str(photos), "--max-drop", "1") == 0
    assert json.loads((tmp_path / "s" / REPORT_JSON).read_text())["calibration"]["images"] == 6


def test_zero_shot_joins_the_gate_where_the_data_has_labels(tiny, tmp_path):
    """ShapesWorld has labels; a caption folder has them only with a zeroshot/ of class folders; --labels none
    leaves them out. The labelled images per class are bounded by --zeroshot-per-class."""
    from mmfusion.data.export import export_shapes
    from mmfusion.data.shapes import ShapesWorld

    _, export = tiny
    report = tmp_path / "r.json"

    def gated(*extra: str) -> dict:
        assert quantize(export, tmp_path / "q", "--max-drop", "1", "--report", str(report), *extra) == 0
        return json.loads(report.read_text())

    shapes = gated("--zeroshot-per-class", "2")
    assert "zeroshot_top1" in shapes["gate"]["drops"] and shapes["verify"]["zeroshot"]["n_images"] > 0
    assert shapes["verify"]["zeroshot"]["n_images"] == 2 * shapes["verify"]["zeroshot"]["classes"]
    assert "zeroshot_top1" not in gated("--labels", "none")["gate"]["drops"]
    folder = tmp_path / "world"
    export_shapes(ShapesWorld(), folder, {"test": 12}, zeroshot_per_class=3, progress=False)
    with_labels = gated("--verify", str(folder), "--zeroshot-per-class", "2")
    assert with_labels["verify"]["zeroshot"]["n_images"] == 2 * with_labels["verify"]["zeroshot"]["classes"]
    import shutil

    shutil.rmtree(folder / "zeroshot")
    assert "zeroshot" not in gated("--verify", str(folder))["verify"]


def test_the_gate_compares_each_metric():
    """Negative control of the gate itself: a drop just over the limit fails, one at the limit passes."""

    def measured(value: float) -> verify.Measured:
        return verify.Measured({k: value for k in verify.GATED}, torch.eye(2), torch.eye(2))

    before = measured(0.50)
    assert verify.compare(before, measured(0.49), 0.01)["passed"]
    assert verify.compare(before, measured(0.52), 0.0)["passed"]  # gains never fail
    gate = verify.compare(before, measured(0.485), 0.01)
    assert not gate["passed"] and gate["worst"]["drop"] == pytest.approx(0.015)
    one = measured(0.5)
    one.metrics["t2i_R@5"] = 0.3
    assert verify.compare(before, one, 0.1)["failed"] == ["t2i_R@5"]
    one = measured(0.5)
    one.metrics["zeroshot_top1"] = 0.45
    assert verify.compare(before, one, 0.01)["failed"] == ["zeroshot_top1"]
    retrieval_only = verify.Measured({k: 0.5 for k in verify.RETRIEVAL}, torch.eye(2), torch.eye(2))
    assert "zeroshot_top1" not in verify.compare(retrieval_only, retrieval_only, 0.0)["drops"]


def test_bad_input_names_the_fix(tiny, tmp_path, capsys):
    ckpt, export = tiny
    assert quantize(tmp_path / "missing", tmp_path / "o") == 2
    assert "no model at" in capsys.readouterr().err
    assert quantize(ckpt, tmp_path / "o", "--runtime", "onnx") == 2  # a checkpoint, not an export
    assert f"mmfusion export onnx --model {ckpt}" in capsys.readouterr().err
    assert quantize(export, export) == 2
    assert "--out must differ from --model" in capsys.readouterr().err
    assert quantize(export, tmp_path / "o", "--calibration", str(tmp_path)) == 2
    assert "--calibration calibrates --mode static" in capsys.readouterr().err
    assert quantize(export, tmp_path / "o", "--mode", "static", "--calibration", str(tmp_path / "none")) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(taken)]) == 2
    assert "is not an mmfusion ONNX export; choose a new --out" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine"
    assert main(["export", "onnx", "--model", "fusion-small", "--out", str(tmp_path / "f")]) == 2
    assert "export onnx` exports a CLIP" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", f"hf:{tmp_path / 'no-such-model'}", "--out", str(tmp_path / "h")]) == 2
    assert "does not exist" in capsys.readouterr().err
