"""Batches, loss and checkpoints of a fusion run (see :class:`mmfusion.train.trainer.Trainer`).

Data: a ShapesWorld fusion task (``data.source: shapes``, ``fusion.task: complementary | correspondence``)
or a feature file (``data.source: clips.npz``), held in memory as tensors. The model's modalities, feature
widths and classes come from the data; ``model.modalities=[image]`` trains on a subset (a unimodal baseline).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.features import MultimodalData, load_feature_file
from ..data.fusion_tasks import FusionTaskConfig, make_fusion_data
from ..eval.classification import evaluate_fusion
from ..models.registry import build_model
from ..modules.losses import focal_loss
from .config import RunConfig
from .trainer import TaskDefaults

log = logging.getLogger(__name__)


def fusion_data(cfg: RunConfig, progress: bool = True) -> tuple[MultimodalData, MultimodalData, dict[str, Any]]:
    """(train, test, what the checkpoint records to rebuild them) for a run config."""
    fc = cfg.fusion
    if cfg.data.source == "shapes":
        tcfg = FusionTaskConfig(task=fc.task, seed=cfg.data.shapes.seed, image_size=fc.image_size, snr_db=fc.snr_db)
        train = make_fusion_data(tcfg, "train", fc.train_size, progress)
        test = make_fusion_data(tcfg, "test", fc.test_size, progress)
        return train, test, {"source": "shapes", "task": asdict(tcfg), "test_size": fc.test_size}
    path = Path(cfg.data.source).expanduser().resolve()
    data = load_feature_file(path)
    train, test = data.split(fc.test_fraction, cfg.train.seed)
    return train, test, {"source": str(path), "test_fraction": fc.test_fraction, "seed": cfg.train.seed}


def rebuild_test_data(trained_on: dict[str, Any]) -> MultimodalData:
    """The test split a fusion checkpoint was evaluated on, from what it recorded."""
    if trained_on.get("source") == "shapes":
        tcfg = FusionTaskConfig(**trained_on["task"])
        return make_fusion_data(tcfg, "test", int(trained_on["test_size"]))
    data = load_feature_file(trained_on["source"])
    return data.split(float(trained_on["test_fraction"]), int(trained_on["seed"]))[1]


class FusionTask(TaskDefaults):
    name = "fusion"

    def __init__(self, cfg: RunConfig, model, train: MultimodalData, test: MultimodalData, device: torch.device):
        self.cfg, self.model, self.data, self.test, self.device = cfg, model, train, test, device
        self.class_weight = None
        if cfg.fusion.class_weights:
            counts = torch.bincount(train.labels, minlength=model.cfg.num_classes).float()
            w = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), torch.zeros_like(counts))
            self.class_weight = w.to(device)

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer=None, data=None) -> FusionTask:
        """The task for ``cfg``; ``data`` = (train, test, trained_on) reuses data already made (benchmarks)."""
        mcfg = cfg.model_config("fusion")
        train, test, trained_on = data or fusion_data(cfg, progress=cfg.train.progress)
        available = train.modalities
        wanted = tuple(cfg.model["modalities"]) if "modalities" in cfg.model else available
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ValueError(f"model.modalities {list(missing)} are not in the data, which has {list(available)}")
        mcfg.modalities = wanted
        mcfg.feature_dims = {m: int(train.features[m].shape[-1]) for m in wanted if m not in ("image", "audio")}
        mcfg.num_classes, mcfg.class_names = len(train.class_names), list(train.class_names)
        if "audio" in wanted:
            mcfg.audio.n_mels = int(train.features["audio"].shape[1])
        model = build_model("fusion", mcfg, name=cfg.preset)
        for m, enc in model.encoders.items():
            if hasattr(enc, "fit"):  # feature encoders standardise with the training data's statistics
                enc.fit(train.features[m], train.present.get(m))
        model = model.to(device)
        model.meta = {"trained_on": trained_on}
        log.info(
            "fusion (%s) on %s: %d train, %d test examples, %d classes, modalities %s, %s parameters",
            mcfg.strategy, trained_on["source"], len(train), len(test), mcfg.num_classes, list(wanted),
            f"{sum(p.numel() for p in model.parameters()):,}",
        )  # fmt: skip
        return cls(cfg, model, train, test, device)

    def dataset_size(self) -> int:
        return len(self.data)

    def evaluate(self, out: str | Path | None = None) -> dict[str, Any]:
        """The held-out report of the trained model: accuracy, macro-F1, missing-modality robustness, confusion."""
        return evaluate_fusion(self.model.eval(), self.test, out)

    @staticmethod
    def summarize(report: dict[str, Any], out: Path) -> list[str]:
        m = report["metrics"]
        lines = [f"held-out: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} on {report['n']} examples"]
        lines += [f"  without {mod}: accuracy {mm['accuracy']:.3f}" for mod, mm in report["missing_modality"].items()]
        return [*lines, f"report:  {out / 'fusion.json'}, {out / 'confusion.png'}"]

    def _indices(self, step: int) -> np.ndarray:
        """Batch ``step`` of a fresh seeded permutation per epoch: a pure function of the step (resumable)."""
        n, b = len(self.data), self.cfg.train.batch_size
        start = step * b
        out = []
        while len(out) < b:
            epoch, pos = divmod(start, n)
            perm = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)
            take = perm[pos : pos + b - len(out)]
            out.extend(take)
            start += len(take)
        return np.asarray(out)

    def prepare(self, step: int) -> dict[str, Any]:
        idx = torch.from_numpy(self.mine(self._indices(step)))
        mods = self.model.modalities
        return {
            "features": {m: self.data.features[m][idx] for m in mods},
            "present": {m: self.data.present[m][idx] for m in mods if m in self.data.present},
            "labels": self.data.labels[idx],
        }

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fc = self.cfg.fusion
        if fc.loss == "focal":
            return focal_loss(logits, labels, fc.focal_gamma, self.class_weight)
        return F.cross_entropy(logits.float(), labels, weight=self.class_weight, label_smoothing=fc.label_smoothing)

    def train_step(
        self, batch: dict[str, Any], accum: int, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        feats = {m: x.to(self.device) for m, x in batch["features"].items()}
        present = {m: x.to(self.device) for m, x in batch["present"].items()}
        labels = batch["labels"].to(self.device)
        n = len(labels)
        chunks = max(1, min(accum, n))
        total, correct = 0.0, 0
        for part in torch.arange(n).chunk(chunks):
            with autocast():
                logits = self.model({m: x[part] for m, x in feats.items()},
                                    present={m: x[part] for m, x in present.items()} or None)  # fmt: skip
            loss = self.loss(logits, labels[part])
            (loss * len(part) / n).backward()
            total += loss.item() * len(part)
            correct += int((logits.argmax(-1) == labels[part]).sum())
        return {"loss": total / n, "acc": correct / n}
