"""Fusion training end to end: a feature file and the ShapesWorld task, checkpoints, resume, the report."""

import json

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.cli.main import main
from mmfusion.train import RunConfig, train
from mmfusion.train.config import DataConfig, FusionDataConfig, TrainConfig
from mmfusion.train.fusion_task import FusionTask


def _feature_file(path, n=800, seed=0):
    """Two modalities whose labels need both: y = (sign of a's first feature) xor (sign of b's first)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 6)).astype(np.float32)
    b = rng.normal(size=(n, 4, 5)).astype(np.float32)  # token sequences
    y = ((a[:, 0] > 0) ^ (b[:, :, 0].mean(1) > 0)).astype(np.int64)
    present = np.ones(n, dtype=bool)
    present[::10] = False
    np.savez(path, a=a, b=b, labels=y, b_present=present, class_names=np.array(["same", "different"]))
    return path


def _cfg(tmp_path, source="shapes", fusion=None, **model):
    return RunConfig(
        task="fusion", preset="fusion-small", model=model, out=str(tmp_path / "run"),
        data=DataConfig(source=str(source)),
        train=TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False, log_every=10, save_every=30),
        fusion=fusion or FusionDataConfig(task="correspondence", train_size=256, test_size=128),
    )  # fmt: skip


def test_feature_file_end_to_end(tmp_path):
    f = _feature_file(tmp_path / "f.npz")
    cfg = _cfg(tmp_path, f, strategy="concat", modality_dropout=0.1)
    result = train(cfg)
    report = result.report
    assert report["n"] == 160 and set(report["missing_modality"]) == {"a", "b"}
    assert report["metrics"]["accuracy"] > 0.75  # the interaction is learned (chance 0.5)
    model = mmfusion.load(tmp_path / "run")
    assert model.cfg.feature_dims == {"a": 6, "b": 5} and model.cfg.class_names == ["same", "different"]
    assert (tmp_path / "run" / "eval" / "confusion.png").is_file()
    saved = json.loads((tmp_path / "run" / "eval" / "fusion.json").read_text())
    assert saved["metrics"]["accuracy"] == pytest.approx(report["metrics"]["accuracy"])


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    f = _feature_file(tmp_path / "f.npz")
    task = FusionTask.build(_cfg(tmp_path, f), torch.device("cpu"))
    a, b = task.prepare(7), task.prepare(7)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["features"]["a"], b["features"]["a"])
    n = len(task.data)
    seen = np.concatenate([task._indices(s) for s in range(n // 64)])
    assert len(np.unique(seen)) == len(seen)  # one epoch: no example twice


def test_unimodal_baseline_and_cli_on_shapesworld(tmp_path, capsys):
    rc = main(["-q", "train", "fusion", "--strategy", "late", "--steps", "5", "--out", str(tmp_path / "late"),
               "--fusion.task=correspondence", "--fusion.train_size=128", "--fusion.test_size=64",
               "--train.batch_size=32", "--train.progress=false", "--model.modalities=[image]"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "held-out: accuracy" in out
    model = mmfusion.load(tmp_path / "late")
    assert model.modalities == ("image",) and model.cfg.strategy == "late"
    with pytest.raises(ValueError, match="not in the data"):
        FusionTask.build(_cfg(tmp_path, modalities=["video"]), torch.device("cpu"))


def test_class_weights_and_focal_loss(tmp_path):
    f = _feature_file(tmp_path / "f.npz")
    task = FusionTask.build(_cfg(tmp_path, f, FusionDataConfig(loss="focal", class_weights=True)), torch.device("cpu"))
    counts = torch.bincount(task.data.labels, minlength=2).float()
    torch.testing.assert_close(task.class_weight * counts, torch.full((2,), counts.sum() / 2))
    out = task.train_step(task.prepare(0), 1, lambda: torch.autocast("cpu", enabled=False))
    assert np.isfinite(out["loss"]) and 0 <= out["acc"] <= 1


def test_eval_fusion_command(tmp_path, capsys):
    f = _feature_file(tmp_path / "f.npz")
    cfg = _cfg(tmp_path, f)
    cfg.train.steps = 5
    train(cfg)
    capsys.readouterr()
    assert main(["eval", "fusion", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "on its held-out split (160 examples)" in out and "without b" in out
    assert (tmp_path / "ev" / "confusion.png").is_file()
    assert (
        main(["eval", "fusion", "--model", str(tmp_path / "run"), "--data", str(f), "--out", str(tmp_path / "all")])
        == 0
    )
    assert "(800 examples)" in capsys.readouterr().out
