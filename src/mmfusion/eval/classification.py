"""Classification metrics and the fusion report: accuracy, macro-F1, confusion, robustness to a missing modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.features import MultimodalData


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def classification_metrics(labels, preds, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 (mean over classes that occur, in truth or prediction) and balanced accuracy."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "balanced_accuracy": float("nan")}
    cm = confusion_matrix(labels, preds, num_classes)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1).astype(float), cm.sum(0).astype(float)
    occurs = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=occurs)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    return {
        "accuracy": float(tp.sum() / len(labels)),
        "macro_f1": float(f1[occurs].mean()),
        "balanced_accuracy": float(recall[support > 0].mean()),
    }


def evaluate_fusion(
    model, data: MultimodalData, out: str | Path | None = None, batch_size: int = 1024
) -> dict[str, Any]:
    """Metrics of a fusion classifier on ``data``, and the same with each modality missing in turn.

    Writes ``fusion.json`` and ``confusion.png`` into ``out`` when given.
    """
    from .plots import plot_confusion

    mods = [m for m in model.modalities if m in data.features]
    features = {m: data.features[m] for m in mods}
    present = {m: data.present[m] for m in mods if m in data.present}
    probs = model.predict(features, present or None, batch_size)
    preds = probs.argmax(-1).numpy()
    labels = data.labels.numpy()
    nc = model.cfg.num_classes
    report: dict[str, Any] = {
        "task": "fusion",
        "model": getattr(model, "name", ""),
        "strategy": model.cfg.strategy,
        "n": len(labels),
        "metrics": classification_metrics(labels, preds, nc),
        "missing_modality": {},
    }
    if len(mods) > 1:
        n = len(labels)
        for m in mods:
            gone = {**present, m: torch.zeros(n, dtype=torch.bool)}
            others = [o for o in mods if o != m]
            if all(o in present for o in others):  # keep every example with at least one modality
                keep = torch.stack([present[o] for o in others]).any(0)
            else:
                keep = torch.ones(n, dtype=torch.bool)
            p = model.predict({o: features[o][keep] for o in mods}, {k: v[keep] for k, v in gone.items()}, batch_size)
            report["missing_modality"][m] = classification_metrics(labels[keep.numpy()], p.argmax(-1).numpy(), nc)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        names = list(model.cfg.class_names) or [str(i) for i in range(nc)]
        cm = confusion_matrix(labels, preds, nc)
        report["plots"] = {
            "confusion": str(plot_confusion(cm, names, out / "confusion.png", title=f"{model.cfg.strategy} fusion"))
        }
        from .report import write_report

        write_report(report, out / "fusion.json")
    return report
