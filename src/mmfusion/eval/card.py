"""Model cards: what a served model is, how it was trained and what it measured, read from its run directory.

A training run (``mmfusion train``, ``mmfusion demo``) leaves ``model/config.json`` (family, preset, what it was
trained on), ``metrics.jsonl`` (one line per logged step), ``plots/training.png`` and the evaluation reports under
``eval/`` (``retrieval.json``, ``zeroshot.json``, ``caption.json``, ``vqa.json``, ...). :func:`model_card` gathers
the headline figures of all of them into one small dict the web page shows beside each model; nothing is
recomputed, so a card costs a few small file reads. A pretrained model (``hf:...``) gets a card with its name only,
a path that does not exist one of family ``missing`` that says so. A report of an unexpected shape is passed over,
never raised: the service's ``GET /models`` answers whatever a run folder holds. :data:`HEADLINES` is the one table of
which figures of a report are its headline; a recipe's summary (:mod:`mmfusion.recipe.metrics`) reads the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..utils.checkpoint_files import CONFIG_FILE, WEIGHTS_FILE, find_checkpoint

__all__ = ["HEADLINES", "card_curve", "headline_metrics", "last_line", "model_card", "read_json"]

# what each family is, in a line a newcomer understands
KINDS = {
    "clip": "image-text embedder (CLIP): search by text or by example, zero-shot labels",
    "captioner": "captioner: an image encoder and a text decoder that writes what it sees",
    "vqa": "question answering: picks an answer from those it saw in training",
    "video": "video classifier over space and time",
    "fusion": "multimodal fusion classifier",
    "reranker": "cross-attention re-ranker of search results",
}


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object read from ``path``; None when it is missing, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def last_line(path: Path) -> dict[str, Any] | None:
    """The last complete JSON object line of ``metrics.jsonl`` (a line cut short by a crash is passed over)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return None


def _round(x: Any) -> float | None:
    """A finite number rounded for showing; None for anything else (a string, a bool, NaN, a list)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return round(float(x), 4)


def _mapping(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


# report kind -> the figures of its "metrics" a card (and a recipe's summary) shows; zeroshot and composition are
# read from their own sections (per group of classes, per direction)
HEADLINES: dict[str, tuple[str, ...]] = {
    "retrieval": ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "semantic_P@1"),
    "caption": ("attribute_accuracy", "CIDEr", "BLEU-4"),
    "vqa": ("accuracy",),
    "fusion": ("accuracy", "macro_f1"),
    "video": ("top1", "direction_accuracy"),
}


def report_kind(report: dict[str, Any]) -> str | None:
    """The kind of an evaluation report (a key of HEADLINES, zeroshot or composition), by its task or its
    metrics; None for a report of another kind."""
    task = report.get("task")
    m = _mapping(report.get("metrics"))
    if isinstance(task, str) and (task in HEADLINES or task in ("zeroshot", "composition")):
        return task
    if "attribute_accuracy" in m or "CIDEr" in m:  # captioning reports of older versions
        return "caption"
    if "per_type" in m and "accuracy" in m:
        return "vqa"
    return None


def headline_metrics(report: Any) -> dict[str, Any]:
    """The few figures of an evaluation report a card shows, by the report's kind: ``{"task", "n", figure: value}``,
    or {} for a report of another kind or of an unexpected shape (what is malformed is left out, never raised)."""
    if not isinstance(report, dict):
        return {}
    task = report_kind(report)
    m = _mapping(report.get("metrics"))
    out: dict[str, Any] = {}
    if task == "zeroshot":  # per group of classes: seen in training, held out of it
        groups = {g: v for g, v in _mapping(report.get("groups")).items() if isinstance(v, dict)}
        for g, v in groups.items():
            out.update({f"{k}_{g}": x for k in ("top1", "top5") if (x := _round(v.get(k))) is not None})
        n = sum(v["n"] for v in groups.values() if _count(v.get("n")))
        return {"task": task, "n": n, **out} if out else {}
    if task == "composition":  # the mean over negative types, per direction (i2t, t2i)
        out = {f"composition_{d}": x for d, v in _mapping(report.get("mean")).items() if (x := _round(v)) is not None}
    elif task is not None:
        out = {k: x for k in HEADLINES[task] if (x := _round(m.get(k))) is not None}
    if task == "vqa":
        per_type = _mapping(m.get("per_type")).items()
        out.update({f"accuracy_{t}": x for t, v in per_type if (x := _round(v)) is not None})
    n = next((x for x in (report.get("n_images"), report.get("n")) if _count(x)), None)
    return {"task": task, "n": n, **out} if out else {}


def _count(x: Any) -> bool:
    """Whether ``x`` is a positive whole number (a count of images or items)."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _run_dir(ckpt: Path) -> Path:
    """The training run around a checkpoint (``RUN/model`` -> ``RUN``), else the checkpoint itself."""
    return ckpt.parent if ckpt.name == "model" and (ckpt.parent / "metrics.jsonl").is_file() else ckpt


def _parameters(ckpt: Path) -> int | None:
    """Parameters in the checkpoint's weights, from the safetensors header alone (no tensor is read)."""
    try:
        with open(ckpt / WEIGHTS_FILE, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100 * 2**20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    total = 0
    for name, entry in header.items() if isinstance(header, dict) else ():
        if name != "__metadata__" and isinstance(entry, dict):
            n = 1
            try:
                for d in entry.get("shape", []):
                    n *= int(d)
            except (TypeError, ValueError):
                return None
            total += n
    return total


def model_card(source: str | None, role: str) -> dict[str, Any] | None:
    """The card of the model loaded from ``source`` (a run, a checkpoint directory, ``hf:`` id) in ``role``
    (embedder, captioner, answerer); None when no model is named."""
    if not source:
        return None
    card: dict[str, Any] = {"role": role, "source": Path(str(source)).name or str(source)}
    if str(source).startswith("hf:"):
        card.update(family="pretrained", name=str(source), what="a pretrained model (Hugging Face)")
        return card
    if not Path(source).expanduser().exists() and not _looks_like_path(str(source)):  # a name, not a folder
        card.update(family="other", name=str(source), what="a model given to the service in code (no run to read)")
        return card
    if not Path(source).expanduser().exists():
        gone = f"{source} does not exist (moved or deleted?): point the service at the model's folder again"
        card.update(family="missing", name=str(source), what=gone)
        return card
    ckpt = find_checkpoint(Path(source).expanduser())
    if ckpt is None:  # an export or a save_pretrained folder: named, not described
        card.update(family="other", name=Path(source).name, what="a model exported or saved elsewhere")
        return card
    meta = read_json(ckpt / CONFIG_FILE) or {}
    family = meta.get("family")
    family = family if isinstance(family, str) else "unknown"
    what = KINDS.get(family, family)
    if family == "captioner" and _mapping(meta.get("config")).get("answers_questions"):
        what = "captioner fine-tuned on questions (VQA by generation): it captions and answers"
    card.update(family=family, name=str(meta.get("name") or ckpt.name), what=what)
    trained = _mapping(meta.get("trained_on"))
    if isinstance(trained.get("source"), str):
        card["trained_on"] = trained["source"]
    if meta.get("quantize") and isinstance(meta["quantize"], str):
        card["quantize"] = meta["quantize"]
    card["parameters"] = _parameters(ckpt)
    run = _run_dir(ckpt)
    last = last_line(run / "metrics.jsonl") or {}
    training = {k: x for k in ("step", "samples", "elapsed_s", "loss") if (x := _round(last.get(k))) is not None}
    if training:
        card["training"] = training
    metrics = []
    for path in sorted((run / "eval").glob("*.json")):  # a report of another kind, or malformed, is passed over
        head = headline_metrics(read_json(path))
        if head:
            metrics.append(head)
    card["metrics"] = metrics
    card["curve"] = card_curve(source) is not None
    return card


def card_curve(source: str | None) -> Path | None:
    """The training curve (``plots/training.png``) of the run behind ``source``, if it has one."""
    if not source or str(source).startswith("hf:"):
        return None
    ckpt = find_checkpoint(Path(source).expanduser())
    if ckpt is None:
        return None
    curve = _run_dir(ckpt) / "plots" / "training.png"
    return curve if curve.is_file() else None


def _looks_like_path(text: str) -> bool:
    """Whether a model reference names a folder (``runs/clip``, ``./m``, ``~/m``) rather than a bare name (what an
    index records for a model it was handed as an object)."""
    return "/" in text or "\\" in text or text.startswith((".", "~"))
