"""Model cards: what a served model is, how it was trained and what it measured, read from its run directory.

A training run (``mmfusion train``, ``mmfusion demo``) leaves ``model/config.json`` (family, preset, what it was
trained on), ``metrics.jsonl`` (one line per logged step), ``plots/training.png`` and the evaluation reports under
``eval/`` (``retrieval.json``, ``zeroshot.json``, ``caption.json``, ``vqa.json``, ...). :func:`model_card` gathers
the headline figures of all of them into one small dict the web page shows beside each model; nothing is
recomputed, so a card costs a few small file reads. A pretrained model (``hf:...``) gets a card with its name only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils.checkpoint_files import CONFIG_FILE, WEIGHTS_FILE, find_checkpoint

__all__ = ["model_card", "card_curve", "headline_metrics"]

# what each family is, in a line a newcomer understands
KINDS = {
    "clip": "image-text embedder (CLIP): search by text or by example, zero-shot labels",
    "captioner": "captioner: an image encoder and a text decoder that writes what it sees",
    "vqa": "question answering: picks an answer from those it saw in training",
    "video": "video classifier over space and time",
    "fusion": "multimodal fusion classifier",
    "reranker": "cross-attention re-ranker of search results",
}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_line(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of ``metrics.jsonl`` (a line cut short by a crash is passed over)."""
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


def _round(x: Any) -> Any:
    return round(float(x), 4) if isinstance(x, (int, float)) else x


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The few figures of an evaluation report a card shows, by the report's kind."""
    m = report.get("metrics") or {}
    task = report.get("task")
    keys: tuple[str, ...]
    if task == "zeroshot":  # per group of classes: seen in training, held out of it
        groups = report.get("groups") or {}
        out = {f"{k}_{g}": _round(v[k]) for g, v in groups.items() for k in ("top1", "top5") if k in v}
        n = sum(int(v.get("n", 0)) for v in groups.values())
        return {"task": task, "n": n, **out} if out else {}
    if task == "retrieval":
        keys = ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "semantic_P@1")
    elif "attribute_accuracy" in m or "CIDEr" in m:
        task, keys = "caption", ("attribute_accuracy", "CIDEr", "BLEU-4")
    elif "per_type" in m and "accuracy" in m:
        task, keys = "vqa", ("accuracy",)
    else:
        return {}
    out = {k: _round(m[k]) for k in keys if k in m}
    if task == "vqa":
        out.update({f"accuracy_{t}": _round(v) for t, v in (m.get("per_type") or {}).items()})
    n = report.get("n_images") or report.get("n")
    return {"task": task, "n": n, **out} if out else {}


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
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict):
            n = 1
            for d in entry.get("shape", []):
                n *= int(d)
            total += n
    return total


def model_card(source: str | None, role: str) -> dict[str, Any] | None:
    """The card of the model loaded from ``source`` (a run, a checkpoint directory, ``hf:`` id) in ``role``
    (embedder, captioner, answerer); None when no model is named."""
    if not source:
        return None
    card: dict[str, Any] = {"role": role, "source": Path(str(source)).name or str(source)}
    if str(source).startswith("hf:") or not Path(source).exists():
        card.update(family="pretrained", name=str(source), what="a pretrained model (Hugging Face)")
        return card
    ckpt = find_checkpoint(source)
    if ckpt is None:  # an export or a save_pretrained folder: named, not described
        card.update(family="other", name=Path(source).name, what="a model exported or saved elsewhere")
        return card
    meta = _read_json(ckpt / CONFIG_FILE) or {}
    family = meta.get("family", "unknown")
    what = KINDS.get(family, family)
    if family == "captioner" and (meta.get("config") or {}).get("answers_questions"):
        what = "captioner fine-tuned on questions (VQA by generation): it captions and answers"
    card.update(family=family, name=meta.get("name") or ckpt.name, what=what)
    trained = meta.get("trained_on") or {}
    if trained.get("source"):
        card["trained_on"] = trained["source"]
    if meta.get("quantize"):
        card["quantize"] = meta["quantize"]
    card["parameters"] = _parameters(ckpt)
    run = _run_dir(ckpt)
    last = _last_line(run / "metrics.jsonl")
    if last:
        card["training"] = {k: _round(last[k]) for k in ("step", "samples", "elapsed_s", "loss") if k in last}
    metrics = []
    for path in sorted((run / "eval").glob("*.json")):
        report = _read_json(path)
        head = headline_metrics(report) if report else {}
        if head:
            metrics.append(head)
    card["metrics"] = metrics
    card["curve"] = card_curve(source) is not None
    return card


def card_curve(source: str | None) -> Path | None:
    """The training curve (``plots/training.png``) of the run behind ``source``, if it has one."""
    if not source or str(source).startswith("hf:"):
        return None
    ckpt = find_checkpoint(source)
    if ckpt is None:
        return None
    curve = _run_dir(ckpt) / "plots" / "training.png"
    return curve if curve.is_file() else None
