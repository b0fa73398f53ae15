"""A new model family is one module and one registry entry: this test writes the module (a config, a model and a
task adapter) and adds the entry, and everything else (the CLI's task list and defaults, training, the held-out
report, ``mmfusion models``, ``create_model`` and ``mmfusion.load``) picks it up with no other change."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import mmfusion
from mmfusion.cli.main import main
from mmfusion.config import field
from mmfusion.models.registry import FAMILIES, FamilySpec, train_tasks
from mmfusion.train import RunConfig, TrainConfig, train
from mmfusion.train.trainer import TaskDefaults

# ---- the family's module ---------------------------------------------------------------------------------


@dataclass
class ToyConfig:
    dim: int = field(4, "input features")
    hidden: int = field(8, "hidden units")


class ToyRegressor(nn.Module):
    family = "toy"

    def __init__(self, cfg: ToyConfig, tokenizer=None, name: str = "toy"):
        super().__init__()
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name
        self.net = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ToyTask(TaskDefaults):
    """Regress a fixed random linear function of the inputs; batches are a pure function of the step."""

    name = "toy"

    def __init__(self, cfg: RunConfig, model: ToyRegressor, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.w = torch.randn(model.cfg.dim, generator=torch.Generator().manual_seed(1))

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer=None) -> ToyTask:
        from mmfusion.models.registry import build_model

        return cls(cfg, build_model("toy", cfg.model_config("toy"), name=cfg.preset).to(device), device)

    def dataset_size(self) -> int:
        return 0

    def _batch(self, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.model.cfg.dim, generator=torch.Generator().manual_seed(seed))
        return x, x @ self.w

    def prepare(self, step: int):
        return self._batch(1000 + step, self.cfg.train.batch_size)

    def train_step(self, batch, accum: int, autocast) -> dict[str, float]:
        x, y = batch
        with autocast() if autocast else contextlib.nullcontext():
            loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        return {"loss": float(loss.detach())}

    def evaluate(self, out: Path) -> dict:
        x, y = self._batch(7, 256)
        with torch.no_grad():
            return {"metrics": {"mse": float(nn.functional.mse_loss(self.model(x), y))}, "n": 256}

    @staticmethod
    def summarize(report: dict, out: Path) -> list[str]:
        return [f"held-out: mse {report['metrics']['mse']:.4f} on {report['n']} examples"]


# ---- the registry entry ----------------------------------------------------------------------------------

TOY = FamilySpec(
    "toy",
    "a tiny regressor that proves a family is one module and one table entry",
    "Regressor",
    ToyConfig,
    ToyRegressor,
    {"toy": ToyTask},
    "toy-tiny",
    presets={"toy-tiny": {"description": "4 inputs, 8 hidden units", "config": {"dim": 4, "hidden": 8}}},
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", TOY)
    return TOY


def test_a_registered_family_is_listed_built_trained_and_loaded(toy, tmp_path, capsys):
    assert train_tasks()["toy"] is toy
    assert "toy-tiny" in mmfusion.list_models("toy-*")
    assert isinstance(mmfusion.create_model("toy-tiny", hidden=3), ToyRegressor)

    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "toy-tiny" in listed and "toy" in listed and "hf-clip" in listed and "whisper" in listed

    out = tmp_path / "toy"
    assert main(["train", "toy", "--steps", "30", "--out", str(out), "--train.lr=0.02", "--model.hidden=16"]) == 0
    printed = capsys.readouterr().out
    assert "trained 30 steps" in printed and "held-out: mse" in printed

    model = mmfusion.load(out)
    assert isinstance(model, ToyRegressor) and model.cfg.hidden == 16
    task = ToyTask.build(RunConfig(task="toy", preset="toy-tiny", model={"hidden": 16}), torch.device("cpu"))
    start = task.evaluate(tmp_path)["metrics"]["mse"]  # an untrained model of the same shape
    task.model = model
    assert task.evaluate(tmp_path)["metrics"]["mse"] < 0.5 * start  # it learned


def test_a_family_is_only_trained_as_its_own_tasks(toy, tmp_path):
    cfg = RunConfig(task="clip", preset="toy-tiny", out=str(tmp_path / "x"), train=TrainConfig(steps=1))
    with pytest.raises(ValueError, match="cannot be trained as `train clip`: it needs a clip preset"):
        train(cfg)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_cli_says_which_preset_a_task_needs(toy, tmp_path, capsys):
    assert main(["train", "toy", "--preset", "clip-tiny", "--steps", "1", "--out", str(tmp_path / "y")]) == 2
    assert "a clip model cannot be trained as `train toy`: it needs a toy preset" in capsys.readouterr().err


def test_without_the_entry_the_family_is_unknown(tmp_path):
    assert "toy" not in FAMILIES and "toy-tiny" not in mmfusion.list_models()
    with pytest.raises(KeyError, match="unknown model preset 'toy-tiny'"):
        mmfusion.create_model("toy-tiny")
