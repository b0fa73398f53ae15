"""Evaluating a text generator (a captioner, an answerer) end to end: the part every generation task shares.

A task names the model's method, how to read its data set, and how to score the texts; :func:`evaluate_generation`
does the rest the same way for all of them: read the set, call the model over batches of it (image files
decoded a batch at a time, one text checked back per input), score, build the report, and, given an output
folder, draw the task's plots and write ``<task>.json``. The helpers below (:func:`readable_images`,
:func:`open_images`, :func:`batched`, :func:`sample_sheet`) are the pieces tasks also use on their own.
"""

from __future__ import annotations

import logging
import math
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..data.shapes import ShapesConfig

log = logging.getLogger(__name__)


class GenerationSet(Protocol):
    """What :func:`evaluate_generation` reads from a task's data set."""

    images: list[Image.Image | Path]  # per input: in memory (ShapesWorld), or a file decoded when its batch runs
    source: str  # where the set came from, for the report


@dataclass
class Scored:
    """What a task makes of the generated texts: its parts of the report, and how to plot them."""

    metrics: dict[str, Any]
    details: dict[str, Any]  # report entries after the metrics: what was measured and how
    rows_key: str  # the report's key for ``rows``: "per_image", "per_question"
    rows: list[dict[str, Any]]  # one per input
    plots: Callable[[Path, dict[str, Any]], dict[str, Path]] = field(repr=False)  # (folder, report) -> files


@dataclass(frozen=True)
class GenerationTask:
    """One generation task as :func:`evaluate_generation` runs it.

    Attributes:
        name: the report's ``task`` and the stem of its JSON file (``captioning`` -> ``captioning.json``).
        method: the model's method, called as ``method(images, *inputs, **options) -> list[str]``.
        load: ``(data, n, split, shapes) -> set``; ``shapes`` is the model's ShapesWorld when ``data="shapes"``.
        inputs: the set's columns passed after the images (questions...), batched alongside them.
        score: ``(set, texts) -> Scored``.
    """

    name: str
    method: str
    load: Callable[[str, int, str, ShapesConfig | None], Any]
    inputs: Callable[[Any], tuple[Sequence, ...]]
    score: Callable[[Any, list[str]], Scored]


def evaluate_generation(
    task: GenerationTask,
    model: Any,
    data: str,
    n: int,
    out: str | Path | None,
    split: str,
    options: Mapping[str, Any] | None,
    batch_size: int,
) -> dict[str, Any]:
    """Run ``model`` over ``n`` inputs of ``data`` and score its texts: the report, written to ``out`` when given.

    Returns:
        The report: ``task``, ``model``, ``data``, ``n``, ``options``, ``metrics``, the task's details,
        ``seconds``, its per-input rows and, with ``out``, the paths of its ``plots``.
    """
    from .report import shapes_config_of, write_report

    t0 = time.perf_counter()
    options = dict(options or {})
    ds = task.load(data, n, split, shapes_config_of(model) if data == "shapes" else None)
    call = getattr(model, task.method)
    texts = batched(
        lambda ims, *rest: call(open_images(ims), *rest, **options), batch_size, ds.images, *task.inputs(ds)
    )
    scored = task.score(ds, texts)
    report: dict[str, Any] = {
        "task": task.name,
        "model": getattr(model, "name", "?"),
        "data": ds.source,
        "n": len(texts),
        "options": options,
        "metrics": scored.metrics,
        **scored.details,
        "seconds": round(time.perf_counter() - t0, 2),
        scored.rows_key: scored.rows,
    }
    if out is not None:
        out = Path(out)
        report["plots"] = {k: str(p) for k, p in scored.plots(out, report).items()}
        write_report(report, out / f"{task.name}.json")
    return report


# ---------------------------------------------------------------------------------------------------
# Pieces


def readable_images(root: Path, files: Sequence[str]) -> set[str]:
    """The files under ``root`` that decode; the others are named in the log. Nothing is kept in memory."""
    from ..data.datasets import DecodeReport
    from ..data.images import ImageDecodeError, load_image

    ok, report = set(), DecodeReport()
    for f in dict.fromkeys(files):
        try:
            load_image(root / f).close()
            ok.add(f)
        except ImageDecodeError as e:
            report.skipped.append((f, str(e)))
    report.log(str(root))
    return ok


def open_images(items: Sequence[Image.Image | Path]) -> list[Image.Image]:
    """Images as given, files decoded (with the checks of :func:`mmfusion.data.images.load_image`), each once."""
    from ..data.images import load_image

    files = {p: load_image(p) for p in dict.fromkeys(im for im in items if not isinstance(im, Image.Image))}
    return [im if isinstance(im, Image.Image) else files[im] for im in items]


def batched(call: Any, batch_size: int, *columns: Sequence) -> list[str]:
    """``call(*batch)`` over equal slices of ``columns``, checking one text comes back per input."""
    out: list[str] = []
    for s in range(0, len(columns[0]), batch_size):
        batch = [list(c[s : s + batch_size]) for c in columns]
        got = list(call(*batch))
        if len(got) != len(batch[0]):
            raise ValueError(
                f"the model returned {len(got)} texts for a batch of {len(batch[0])} inputs; expected one each"
            )
        out.extend(str(t) for t in got)
    return out


def sample_sheet(
    images: Sequence[Any], lines: Sequence[Sequence[tuple[str, str]]], path: str | Path, title: str = "", cols: int = 4
) -> Path:
    """A grid of images, each with its lines of text beneath; a line is ``(text, colour)``, wrapped to fit."""
    from .plots import _save, plt

    width = 34  # characters per wrapped line at 8.5 pt in a 3-inch cell
    wrapped = [[(textwrap.fill(t, width), col) for t, col in cell] for cell in lines]
    text_rows = max((sum(t.count("\n") + 1 for t, _ in cell) for cell in wrapped), default=1)
    rows = max(1, math.ceil(len(images) / cols))
    text_h = 0.17 * text_rows + 0.1
    height = rows * (2.6 + text_h) + 0.5
    fig = plt.figure(figsize=(3.0 * cols, height))
    grid = fig.add_gridspec(
        rows * 2, cols, height_ratios=[2.6, text_h] * rows, hspace=0.05, wspace=0.08, top=1 - 0.45 / height, bottom=0.01
    )
    for k, (img, cell) in enumerate(zip(images, wrapped)):
        r, col = divmod(k, cols)
        ax = fig.add_subplot(grid[2 * r, col])
        arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
        ax.imshow(arr, interpolation="nearest" if max(arr.shape[:2]) < 200 else "antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        tx = fig.add_subplot(grid[2 * r + 1, col])
        tx.axis("off")
        y = 1.0
        for text, colour in cell:
            tx.text(0.0, y, text, va="top", ha="left", fontsize=8.5, color=colour, transform=tx.transAxes)
            y -= (text.count("\n") + 1) / text_rows
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / height)
    return _save(fig, path)
