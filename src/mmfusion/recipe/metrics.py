"""The few numbers that say how a step went, read from what its command wrote (the reports stay where the command
put them), for the step's stamp and the recipe's summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# report file -> its headline metrics (key in the report's "metrics", the name shown)
HEADLINES = {
    "retrieval": [("i2t_R@1", "i2t R@1"), ("t2i_R@1", "t2i R@1"), ("semantic_P@1", "semantic P@1")],
    "captioning": [("CIDEr", "CIDEr"), ("attribute_accuracy", "attributes")],
    "vqa": [("accuracy", "VQA accuracy")],
}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_line(path: Path) -> dict[str, Any] | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def report_metrics(name: str, report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one evaluation report (retrieval.json, zeroshot.json, captioning.json, ...)."""
    m = report.get("metrics") or {}
    if name in HEADLINES:
        return {label: m[key] for key, label in HEADLINES[name] if isinstance(m.get(key), (int, float))}
    if name == "zeroshot":
        return {f"zero-shot {g}": v["top1"] for g, v in (report.get("groups") or {}).items() if "top1" in v}
    if name == "composition":
        return {f"composition {d}": v for d, v in (report.get("mean") or {}).items() if isinstance(v, (int, float))}
    return {k: v for k, v in list(m.items())[:3] if isinstance(v, (int, float)) and not isinstance(v, bool)}


def step_metrics(kind: str, out: Path, is_folder: bool = False) -> dict[str, Any]:
    """Key metrics of a finished step whose output is ``out``."""
    if kind == "data":
        return _data(out, is_folder)
    if kind == "train":
        row = _last_line(out / "metrics.jsonl") or {}
        return {k: row[k] for k in ("step", "loss") if k in row}
    if kind == "eval":
        found: dict[str, Any] = {}
        for p in sorted(out.glob("*.json")):
            report = _read(p)
            if report is not None:
                found.update(report_metrics(p.stem, report))
        return found
    if kind == "export":
        cfg = _read(out / "export.json") or {}
        return {"embed_dim": cfg.get("embed_dim"), "MB": _size_mb(out)}
    if kind == "quantize":
        report = _read(out / "quantize_report.json") or {}
        size = report.get("size_mb") or {}
        return {"gate": "passed", "MB before": size.get("before"), "MB after": size.get("after")}
    if kind == "index":
        from ..index import Index

        with Index.open(out) as ix:
            return {"images": ix.store.count()}
    return {}


def _data(out: Path, is_folder: bool) -> dict[str, Any]:
    if not is_folder:
        world = _read(out / "world.json") or {}
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
