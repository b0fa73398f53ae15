"""Training adapter for the video classifier: clips -> action, cross-entropy; and its held-out report.

Data: ShapesWorld clips (``data.source: shapes``; example ``i`` of step ``s`` is training clip ``s * batch + i``,
so the stream never repeats and a resumed run sees the same batches; or ``video.train_size`` clips reused
every epoch), or a folder of video files with ``labels.jsonl``: ``DIR/train`` and ``DIR/test`` as
``mmfusion data shapes --video`` writes them, or one folder, of which ``video.test_fraction`` is held out.
Frames per clip and their size come from the model preset; files are sampled and resized to fit.

The report (``eval/video.json`` and ``eval/confusion.png``) gives top-1 and top-5 accuracy, macro-F1, the
accuracy of every class, and accuracy on the direction classes (left/right/up/down): those only frame
order tells apart.
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

from ..data.datasets import DataFormatError, read_jsonl
from ..data.video import ShapesVideo, ShapesVideoConfig, VideoFolder, normalize_video, video_classes
from ..eval.video import evaluate_video
from ..models.registry import build_model
from ..models.video import VideoClassifier
from .config import RunConfig
from .trainer import TaskDefaults, batch_indices

log = logging.getLogger(__name__)


class ShapesClips:
    """ShapesWorld clips of one split: the endless stream (``size`` 0) or its first ``size`` clips."""

    def __init__(self, video: ShapesVideo, split: str, size: int = 0):
        self.video, self.split, self.size = video, split, size

    def __len__(self) -> int:
        return self.size

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        return self.video.batch(self.split, indices)


class FolderClips:
    """Decoded clips held in memory (uint8)."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray):
        self.clips, self.labels = clips, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices)
        return self.clips[idx], self.labels[idx]


def _folder_classes(root: Path, parts: list[Path]) -> list[str]:
    """The class list of a video folder: its video.json's actions, else every label found, sorted."""
    return video_classes(root) or sorted(
        {str(obj.get("action")) for p in parts for _, obj in read_jsonl(p / "labels.jsonl")}
    )


def video_data(cfg: RunConfig, frames: int, size: int) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """(train source, test source, class names, what the checkpoint records) for a run config."""
    vc = cfg.video
    if cfg.data.source == "shapes":
        scfg = ShapesVideoConfig(seed=cfg.data.shapes.seed, frames=frames, image_size=size,
                                 actions=tuple(vc.actions), max_distractors=vc.max_distractors)  # fmt: skip
        video = ShapesVideo(scfg)
        trained_on = {"source": "shapes", "video": asdict(scfg), "test_size": vc.test_size}
        return ShapesClips(video, "train", vc.train_size), ShapesClips(video, "test", vc.test_size), \
            video.class_names, trained_on  # fmt: skip
    root = Path(cfg.data.source).expanduser().resolve()
    parts = [root]
    if (root / "train" / "labels.jsonl").is_file():  # splits as `mmfusion data shapes --video` writes them
        parts = [root / "train"] + ([root / "test"] if (root / "test" / "labels.jsonl").is_file() else [])
    if not (parts[0] / "labels.jsonl").is_file():
        raise DataFormatError(f"no labels.jsonl in {root} or {root / 'train'}: give a folder of video files with "
                              "labels.jsonl, as `mmfusion data shapes --video` writes")  # fmt: skip
    names = _folder_classes(root, parts)
    progress = cfg.train.progress
    loaded = [VideoFolder.load(p, frames, size, names, progress=progress) for p in parts]
    trained_on = {"source": str(root), "skipped": sum(len(f.skipped) for f in loaded)}
    if len(loaded) == 2:
        train, test = loaded
        return FolderClips(train.clips, train.labels), FolderClips(test.clips, test.labels), names, trained_on
    whole = loaded[0]
    perm = np.random.default_rng(cfg.train.seed).permutation(len(whole))
    n_test = int(round(len(whole) * vc.test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if len(train_idx) == 0:
        raise DataFormatError(f"{root}: no readable clips left to train on ({len(whole.skipped)} skipped)")
    trained_on.update(test_fraction=vc.test_fraction, seed=cfg.train.seed)
    return (FolderClips(whole.clips[train_idx], whole.labels[train_idx]),
            FolderClips(whole.clips[test_idx], whole.labels[test_idx]), names, trained_on)  # fmt: skip


class VideoTask(TaskDefaults):
    """Batches, loss and checkpoints of a video run (see :class:`mmfusion.train.trainer.Trainer`)."""

    name = "video"

    def __init__(self, cfg: RunConfig, model: VideoClassifier, train, test, device: torch.device):
        self.cfg, self.model, self.source, self.test, self.device = cfg, model, train, test, device

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer=None) -> VideoTask:
        mcfg = cfg.model_config("video")
        e = mcfg.encoder
        train, test, names, trained_on = video_data(cfg, e.frames, e.image_size)
        mcfg.class_names = list(names)
        model = build_model("video", mcfg, name=cfg.preset).to(device)
        model.meta = {"trained_on": trained_on}
        log.info("video (%s attention) on %s: %s train, %d test clips, %d classes, %s parameters", e.attention,
                 trained_on["source"], len(train) or "endless", len(test), len(names),
                 f"{sum(p.numel() for p in model.parameters()):,}")  # fmt: skip
        return cls(cfg, model, train, test, device)

    def dataset_size(self) -> int:
        return len(self.source)

    def prepare(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.mine(batch_indices(self.cfg.train.seed, step, self.cfg.train.batch_size, len(self.source)))
        clips, labels = self.source.batch(indices)
        mean, std = self.model.cfg.image_mean, self.model.cfg.image_std
        return normalize_video(torch.from_numpy(clips), mean, std), torch.from_numpy(labels)

    def train_step(self, batch, accum: int, autocast: Callable[[], contextlib.AbstractContextManager]):
        clips, labels = (t.to(self.device) for t in batch)
        n = len(labels)
        total = {"loss": 0.0, "acc": 0.0}
        for part in torch.arange(n).chunk(max(1, min(accum, n))):
            with autocast():
                logits = self.model(clips[part])
            loss = F.cross_entropy(logits.float(), labels[part])
            (loss * len(part) / n).backward()
            total["loss"] += float(loss.detach()) * len(part) / n
            total["acc"] += float((logits.argmax(-1) == labels[part]).sum()) / n
        return total

    def evaluate(self, out: str | Path | None = None, batch_size: int = 64) -> dict[str, Any]:
        """The held-out report of the trained model: top-1/top-5, macro-F1, the confusion matrix (see
        :func:`~mmfusion.eval.video.evaluate_video`)."""
        clips, labels = self.test.batch(np.arange(len(self.test)))
        return evaluate_video(self.model, clips, labels, out, batch_size)

    @staticmethod
    def summarize(report: dict[str, Any], out: Path) -> list[str]:
        m, n = report["metrics"], report["n"]
        directions = f", directions {m['direction_accuracy']:.3f}" if "direction_accuracy" in m else ""
        return [
            f"held-out: top-1 {m['top1']:.3f}, top-5 {m['top5']:.3f}{directions} on {n} clips",
            f"report:  {out / 'video.json'}, {out / 'confusion.png'}",
        ]
