"""The held-out report of a video classifier: top-1/top-5, macro-F1, per-class and direction accuracy, and the
confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.video import DIRECTIONS
from .classification import classification_metrics, confusion_matrix
from .plots import plot_confusion
from .report import write_report
from .zeroshot import topk_accuracy


def evaluate_video(
    model, clips: np.ndarray, labels: np.ndarray, out: str | Path | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, macro-F1, per-class and direction-class accuracy of ``model`` on uint8 clips
    (N, T, H, W, 3) with labels (N,); writes ``video.json`` and ``confusion.png`` into ``out`` when given."""
    names = list(model.cfg.class_names)
    probs = model.predict(clips, batch_size)
    truth = torch.as_tensor(labels, dtype=torch.long)
    preds = probs.argmax(-1).numpy()
    metrics = classification_metrics(labels, preds, len(names))
    metrics.update(top1=metrics["accuracy"], **topk_accuracy(probs, truth, (5,)))
    per_class = {c: float((preds[labels == i] == i).mean()) for i, c in enumerate(names) if (labels == i).any()}
    directions = [names.index(d) for d in DIRECTIONS if d in names]
    on_dir = np.isin(labels, directions)
    if on_dir.any():  # which of left/right/up/down, among the direction clips (chance: 1/4)
        metrics["direction_accuracy"] = float((preds[on_dir] == labels[on_dir]).mean())
    report: dict[str, Any] = {
        "task": "video",
        "model": getattr(model, "name", ""),
        "attention": model.cfg.encoder.attention,
        "n": len(labels),
        "metrics": metrics,
        "per_class_accuracy": per_class,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cm = confusion_matrix(labels, preds, len(names))
        title = f"{model.cfg.encoder.attention} attention: top-1 {metrics['top1']:.3f}"
        report["plots"] = {"confusion": str(plot_confusion(cm, names, out / "confusion.png", title=title))}
        report["confusion"] = cm.tolist()
        write_report(report, out / "video.json")
    return report
