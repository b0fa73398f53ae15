"""PNG plots for reports: training curves, similarity heat maps, confusion matrices, recall bars.

Matplotlib's Agg backend draws off-screen, so plots work on servers with no display.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..utils.io import atomic_write_bytes  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window * 2 or window < 2:
        return y
    kernel = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def plot_training_curves(metrics_jsonl: str | Path, out: str | Path) -> Path:
    """Loss, in-batch accuracy, learning rate and temperature against step."""
    rows = [json.loads(ln) for ln in Path(metrics_jsonl).read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{metrics_jsonl} has no rows to plot")
    step = np.array([r["step"] for r in rows])

    def col(k: str) -> np.ndarray | None:
        return np.array([r[k] for r in rows], dtype=float) if all(k in r for r in rows) else None

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    window = max(1, len(rows) // 30)
    ax = axes[0, 0]
    loss = col("loss")
    ax.plot(step, loss, color="#c8d6e5", lw=1, label="per log")
    ax.plot(step, _smooth(loss, window), color="#2e86de", lw=2, label="smoothed")
    ax.set_title("training loss")
    ax.legend(frameon=False)
    ax = axes[0, 1]
    for k, c, name in (("i2t_acc", "#10ac84", "image→text"), ("t2i_acc", "#ee5253", "text→image"),
                       ("acc", "#10ac84", "accuracy"), ("token_acc", "#10ac84", "next-token accuracy")):  # fmt: skip
        if (v := col(k)) is not None:
            ax.plot(step, _smooth(v, window), color=c, lw=2, label=name)
    ax.set_ylim(0, 1.02)
    ax.set_title("in-batch accuracy (smoothed)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False)
    ax = axes[1, 0]
    ax.plot(step, col("lr"), color="#8e44ad", lw=2)
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax = axes[1, 1]
    if (temp := col("temperature")) is not None:
        ax.plot(step, temp, color="#e67e22", lw=2)
        ax.set_title("temperature (1 / logit scale)")
    elif (sps := col("samples_per_s")) is not None:
        ax.plot(step, sps, color="#e67e22", lw=2)
        ax.set_title("training speed (samples/s)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.25)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"{Path(metrics_jsonl).parent.name}: {int(step[-1])} steps", fontsize=12)
    fig.tight_layout()
    return _save(fig, out)


def plot_similarity(
    sim: np.ndarray, images: np.ndarray, texts: Sequence[str], out: str | Path, title: str = "image-text similarity"
) -> Path:
    """Heat map of cosine similarities, with the images along the top and the captions down the side."""
    n = len(texts)
    fig = plt.figure(figsize=(2.2 + 0.55 * n, 1.6 + 0.42 * n))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, n / 1.2], hspace=0.02)
    top = fig.add_subplot(grid[0])
    strip = np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)), constant_values=255) for im in images[:n]], axis=1)
    top.imshow(strip)
    top.axis("off")
    ax = fig.add_subplot(grid[1])
    im = ax.imshow(sim[:n, :n].T, cmap="viridis", aspect="auto")
    ax.set_yticks(range(n), [t if len(t) < 48 else t[:45] + "…" for t in texts[:n]], fontsize=8)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("image")
    for i in range(n):
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=1.2))
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="cosine similarity")
    top.set_title(title)
    return _save(fig, out)


def plot_confusion(
    cm: np.ndarray,
    classes: Sequence[str],
    out: str | Path,
    title: str = "confusion matrix",
    highlight: Sequence[str] = (),
) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across); highlighted labels in red."""
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(5.0, 0.22 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fs = 8 if n <= 20 else 6
    ax.set_xticks(range(n), classes, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), classes, fontsize=fs)
    for lab in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if lab.get_text() in set(highlight):
            lab.set_color("#c0392b")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="fraction of true class")
    return _save(fig, out)


def plot_recall(metrics: dict[str, float], out: str | Path, title: str = "retrieval") -> Path:
    """Grouped bars of Recall@K for both directions, plus semantic precision when present."""
    groups = [("image→text", "i2t"), ("text→image", "t2i")]
    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("i2t_R@")})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / (len(groups) + (1 if "semantic_P@1" in metrics else 0))
    x = np.arange(len(ks))
    bars = [(name, [metrics[f"{p}_R@{k}"] for k in ks]) for name, p in groups]
    if "semantic_P@1" in metrics:
        bars.append(("semantic precision (text→image)", [metrics.get(f"semantic_P@{k}", np.nan) for k in ks]))
    for i, (name, values) in enumerate(bars):
        b = ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(b, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, [f"@{k}" for k in ks])
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, out)


def plot_composition(types: dict[str, dict], out: str | Path, title: str = "composition", chance: float = 0.5) -> Path:
    """Bars of accuracy per negative type (image→text and text→image, 95% intervals), with the chance line.

    Args:
        types: type -> {"i2t": {"accuracy", "ci95", "n"}, "t2i": {...}}, as in the composition report.
    """
    kinds = list(types)
    directions = [(d, name) for d, name in (("i2t", "image→text"), ("t2i", "text→image"))
                  if any(d in t for t in types.values())]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(kinds) + 2), 3.8))
    width = 0.8 / max(1, len(directions))
    x = np.arange(len(kinds))
    for i, (d, name) in enumerate(directions):
        acc = [types[k][d]["accuracy"] if d in types[k] else np.nan for k in kinds]
        err = [types[k][d]["ci95"] if d in types[k] else 0.0 for k in kinds]
        b = ax.bar(x + (i - (len(directions) - 1) / 2) * width, acc, width, yerr=err, capsize=2, label=name)
        ax.bar_label(b, fmt="%.2f", fontsize=7, padding=2)
    ax.axhline(chance, color="#c0392b", ls="--", lw=1, label=f"chance ({chance:g})")
    ax.set_xticks(x, [k.replace("_", "\n") for k in kinds], fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy (true caption wins)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="upper center", ncol=3)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, out)
