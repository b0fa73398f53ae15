"""The mmfusion command on tiny budgets, in-process and (for kill/resume) as a real subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmfusion.cli.main import main
from tests.utils import TINY_OVERRIDES

TINY_TRAIN = [
    "--train.batch_size=8",
    "--train.progress=false",
    "--train.threads=1",
    "--train.log_every=1",
    "--data.tokenizer_captions=200",
    *[f"--{o}" for o in TINY_OVERRIDES],
]


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "clip-tiny" in out and "vit-b-32" in out


def test_train_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("--train.lr", "--train.accum_steps", "--data.shapes.heldout", "--model.vision.layers", "--resume"):
        assert key in out, key


def test_data_train_eval_end_to_end(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert (
        main(
            [
                "-q",
                "data",
                "shapes",
                "--out",
                str(data),
                "--train",
                "40",
                "--test",
                "12",
                "--heldout",
                "6",
                "--zeroshot-per-class",
                "1",
            ]
        )
        == 0
    )
    assert (data / "train" / "captions.jsonl").is_file() and (data / "zeroshot" / "seen").is_dir()
    assert main(["-q", "train", "clip", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY_TRAIN]) == 0
    assert (run / "model" / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5  # 40 images / batch 8
    assert (
        main(
            [
                "-q",
                "eval",
                "all",
                "--model",
                str(run),
                "--data",
                str(data),
                "--n",
                "12",
                "--json",
                str(tmp_path / "rep.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "R@10" in out and "top-1" in out
    rep = json.loads((tmp_path / "rep_retrieval.json").read_text())
    assert rep["n_images"] == 12 and "semantic_P@1" in rep["metrics"]
    assert json.loads((tmp_path / "rep_zeroshot.json").read_text())["groups"]["heldout"]["n"] == 8
    assert (run / "eval" / "similarity.png").is_file()


def test_yaml_config_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  steps: 2\n  lr: 1e-3\nmodel:\n  vision:\n    layers: 1\n")
    assert (
        main(
            [
                "-q",
                "train",
                "clip",
                "--config",
                str(tmp_path / "run.yaml"),
                "--out",
                str(tmp_path / "r"),
                *TINY_TRAIN,
                "--train.lr=5e-4",
            ]
        )
        == 0
    )
    import yaml

    saved = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["train"]["lr"] == 5e-4 and saved["model"]["vision"]["layers"] == 1


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "clip", "--out", str(tmp_path / "x"), "--steps", "1", "--train.lr=fast"]) == 2
    assert "train.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["train", "clip", "--out", str(tmp_path / "x"), "--steps", "1", "--train.lrr=1"]) == 2
    assert "unknown config key train.lrr; did you mean train.lr?" in capsys.readouterr().err
    assert main(["train", "clip", "--out", str(tmp_path / "x"), "--steps", "1", "--data", str(tmp_path)]) == 2
    assert "no captions.jsonl" in capsys.readouterr().err
    assert main(["train", "clip", "--out", str(tmp_path / "x"), "--preset", "nope", "--steps", "1"]) == 2
    assert "unknown model preset 'nope'" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--model", str(tmp_path / "none")]) == 2
    assert "no model at" in capsys.readouterr().err


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmfusion.cli.main", "-q", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["train", "clip", "--steps", "40", "--train.save_every=4", *TINY_TRAIN]
    straight = _run_cli([*args, "--out", str(tmp_path / "a")])
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()
    victim = _run_cli([*args, "--out", str(tmp_path / "b")])
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name >= "step-000012" for p in ckpts.iterdir())):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert done and done[-1] < "step-000040", done
    resumed = _run_cli([*args, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("a", "b")
    ]
    assert len(losses[0]) == 40 and losses[0] == losses[1]
