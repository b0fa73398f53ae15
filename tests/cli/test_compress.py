"""``mmfusion distill`` and ``mmfusion prune`` from the command line: ordinary runs come out, with reports."""

from __future__ import annotations

import json

import mmfusion
from mmfusion.cli.main import main
from tests.utils import TINY_OVERRIDES, tiny_clip

QUICK = ["--train.batch_size=8", "--train.progress=false", "--train.threads=1", "--train.warmup_steps=1"]


def test_distill_trains_a_student_from_a_teacher(tmp_path, capsys):
    teacher = tiny_clip(tmp_path / "teacher")
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher), "--student-preset", "clip-tiny", "--steps", "2", "--out", str(out)]
    tiny = [f"--{o}" for o in TINY_OVERRIDES]
    assert main([*argv, "--embed-weight", "0.5", *tiny, *QUICK, "--data.tokenizer_captions=200"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "affinity" in rows[-1] and "embed" in rows[-1]
    assert mmfusion.load(out).meta["distilled_from"] == str(teacher)


def test_distill_inherits_the_teachers_weights(tmp_path, capsys):
    teacher = tiny_clip(tmp_path / "teacher")
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher), "--student-preset", "clip-tiny", "--steps", "1", "--out", str(out)]
    tiny = [f"--{o}" for o in TINY_OVERRIDES]
    assert main([*argv, "--inherit", *tiny, *QUICK, "--distill.inherit_by=leading"]) == 0
    inherited = mmfusion.load(out).meta["inherited_from"]
    assert inherited["by"] == "leading" and inherited["image"]["blocks"] == [0]


def test_prune_writes_a_smaller_run_with_its_report(tmp_path, capsys):
    src = tiny_clip(tmp_path / "clip")
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(src), "--out", str(out), "--heads", "0.5", "--mlp", "0.5", "--batches", "1",
            "--batch-size", "8", "--eval-n", "12"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "image encoding" in printed and "i2t_R@10" in printed
    model = mmfusion.load(out)
    assert model.cfg.vision.layer_heads == [1] and model.cfg.vision.layer_mlp == [32]  # 2 heads, 64 channels
    report = json.loads((out / "prune_report.json").read_text())
    assert report["kept"]["parameters"]["after"] < report["kept"]["parameters"]["before"]
    assert set(report["quality"]["after"]) >= {"i2t_R@10", "t2i_R@10"} and report["recover"] is None


def test_prune_recovers_with_the_original_as_teacher(tmp_path):
    src = tiny_clip(tmp_path / "clip")
    out = tmp_path / "recovered"
    argv = ["prune", "--model", str(src), "--out", str(out), "--batches", "1", "--batch-size", "8", "--eval-n", "0",
            "--recover", "2", *QUICK]  # fmt: skip
    assert main(argv) == 0
    model = mmfusion.load(out)
    assert model.meta["distilled_from"] == str(src) and model.meta["pruned"]["heads"] == 0.3
    assert (out / "pruned" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()


def test_prune_sweep_draws_the_curve(tmp_path, capsys):
    src = tiny_clip(tmp_path / "clip")
    out = tmp_path / "sweep"
    argv = ["prune", "--model", str(src), "--out", str(out), "--sweep", "0.25,0.5", "--batches", "1",
            "--batch-size", "8", "--eval-n", "12"]  # fmt: skip
    assert main(argv) == 0
    curve = json.loads((out / "prune_curve.json").read_text())
    assert [p["ratio"] for p in curve["points"]] == [0.0, 0.25, 0.5]
    assert (out / "prune_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert mmfusion.load(out / "ratio-0.5").cfg.text.layer_heads == [1]


def test_prune_names_the_fix(tmp_path, capsys):
    src = tiny_clip(tmp_path / "clip")
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "o"), "--heads", "1.0"]) == 2
    assert "fractions in [0, 1)" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "o"), "--train.lr=1"]) == 2
    assert "apply to --recover only" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--out", str(tmp_path)]) == 2  # holds the source model
    assert "is not empty; choose a new --out" in capsys.readouterr().err
