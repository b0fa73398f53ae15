"""The few numbers that say how a step went, read from what its command wrote (the reports stay where the command
put them), for the step's stamp and the recipe's summary table.

An evaluation's headline figures are those a model card shows (:func:`mmfusion.eval.card.headline_metrics`, one
table for both), named here for the summary table; the files are read by the card's readers too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..eval.card import headline_metrics, last_line, read_json

# how the summary table names a report kind's figures: a prefix to the card's key, written with spaces
PREFIXES = {"zeroshot": "zero-shot ", "vqa": "VQA ", "fusion": "fusion ", "video": "video "}


def report_metrics(report: Any) -> dict[str, float]:
    """The headline numbers of one evaluation report, named for the summary (``i2t R@1``, ``zero-shot top1 seen``);
    {} for a report of another kind or of an unexpected shape."""
    head = dict(headline_metrics(report))
    task = head.pop("task", None)
    head.pop("n", None)
    return {PREFIXES.get(str(task), "") + key.replace("_", " "): value for key, value in head.items()}


def step_metrics(kind: str, out: Path, is_folder: bool = False) -> dict[str, Any]:
    """Key metrics of a finished step whose output is ``out``."""
    if kind == "data":
        return _data(out, is_folder)
    if kind == "train":
        row = last_line(out / "metrics.jsonl") or {}
        return {k: row[k] for k in ("step", "loss") if k in row}
    if kind == "eval":
        found: dict[str, Any] = {}
        for p in sorted(out.glob("*.json")):
            found.update(report_metrics(read_json(p)))
        return found
    if kind == "export":
        cfg = read_json(out / "export.json") or {}
        return {"embed_dim": cfg.get("embed_dim"), "MB": _size_mb(out)}
    if kind == "quantize":
        report = read_json(out / "quantize_report.json") or {}
        size = report.get("size_mb") or {}
        return {"gate": "passed", "MB before": size.get("before"), "MB after": size.get("after")}
    if kind == "index":
        from ..index import Index

        with Index.open(out) as ix:
            videos = ix.store.video_counts()["videos"]
            return {"images": ix.store.count() - videos, **({"videos": videos} if videos else {})}
    return {}


def _data(out: Path, is_folder: bool) -> dict[str, Any]:
    if not is_folder:
        world = read_json(out / "world.json") or {}
        return {f"{k} scenes": v for k, v in (world.get("counts") or {}).items() if v}
    from ..data.datasets import read_captions

    found = {}
    for root in (out, out / "train", out / "test"):
        if (root / "captions.jsonl").is_file():
            records = read_captions(root)
            label = "" if root == out else f"{root.name} "
            found[f"{label}images"] = len(records)
            found[f"{label}captions"] = sum(len(r.captions) for r in records)
    return found


def _size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 2)


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if v is not None
    )
