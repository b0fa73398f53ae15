"""Run an evaluation end to end: data -> embeddings -> metrics -> JSON report + PNG plots.

``data`` is ``"shapes"`` (the in-memory ShapesWorld, built with the same config the model was trained
on) or a folder in mmfusion's on-disk format. Reports are written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import CaptionFolder, ClassFolder, DataFormatError, read_jsonl
from ..data.prompts import PHOTO_TEMPLATES, SHAPES_TEMPLATES
from ..data.shapes import MISS_REASONS, Scene, ShapesConfig, ShapesWorld, caption_kind, satisfies, why_false
from ..interfaces import Embedder
from ..utils.io import atomic_write_json
from . import plots
from .retrieval import CHUNK, embed_images, embed_texts, retrieval_metrics, semantic_precision
from .zeroshot import class_embeddings, confusion_matrix, topk_accuracy

log = logging.getLogger(__name__)


def shapes_config_of(embedder: Any) -> ShapesConfig:
    """The ShapesWorld a model was trained on (its held-out split), or the default world."""
    from ..config import from_dict

    trained_on = (getattr(embedder, "meta", None) or {}).get("trained_on") or {}
    return from_dict(ShapesConfig, trained_on["shapes"]) if "shapes" in trained_on else ShapesConfig()


@dataclass
class RetrievalSet:
    images: np.ndarray  # (N, S, S, 3) uint8
    captions: list[list[str]]  # per image
    scenes: list[Scene] | None  # for semantic precision
    meanings: list[list[dict | None]] | None  # per image, per caption
    source: str


def split_folder(data: str | Path, split: str, filename: str) -> Path:
    """The folder of an evaluation set: ``data`` itself or its ``split`` subfolder, whichever holds ``filename``."""
    root = next((p for p in (Path(data), Path(data) / split) if (p / filename).is_file()), None)
    if root is None:
        raise DataFormatError(f"no {filename} in {data} or {Path(data) / split}; give 'shapes' or such a folder")
    return root


def scenes_for(root: Path, images: list[str]) -> list[Scene] | None:
    """The ShapesWorld scenes of ``images`` from ``root/scenes.jsonl`` (an export's), when it lists every one."""
    if not (root / "scenes.jsonl").is_file():
        return None
    by_image = {obj["image"]: Scene.from_dict(obj) for _, obj in read_jsonl(root / "scenes.jsonl")}
    return [by_image[im] for im in images] if all(im in by_image for im in images) else None


def retrieval_set(data: str, n: int, split: str = "test", shapes: ShapesConfig | None = None) -> RetrievalSet:
    if data == "shapes":
        world = ShapesWorld(shapes)
        samples = [world.sample(split, i) for i in range(n)]
        return RetrievalSet(
            np.stack([np.asarray(s.image) for s in samples]),
            [[c.text for c in s.captions] for s in samples],
            [s.scene for s in samples],
            [[c.meaning for c in s.captions] for s in samples],
            f"ShapesWorld {split} split, {n} scenes",
        )
    root = split_folder(data, split, "captions.jsonl")
    first = next(iter(read_jsonl(root / "captions.jsonl")))[1].get("image", "")
    folder = CaptionFolder(root, _eval_size([root / first]))
    records = folder.records[:n] if n else folder.records
    scenes = scenes_for(root, [r.image for r in records])
    meanings = [[e.get("meaning") for e in r.extras] for r in records]
    has_meaning = scenes is not None and all(m is not None for ms in meanings for m in ms)
    return RetrievalSet(
        folder.images[: len(records)],
        [r.captions for r in records],
        scenes,
        meanings if has_meaning else None,
        f"{root} ({len(records)} images)",
    )


def _eval_size(candidates: Any) -> int:
    """Decode folder images at their own size when square and small, else at 224 (models resize anyway)."""
    from PIL import Image

    for p in candidates:
        try:
            with Image.open(p) as im:
                w, h = im.size
            return w if w == h and w <= 512 else 224
        except Exception:
            continue
    return 224


def evaluate_retrieval(
    embedder: Embedder,
    data: str = "shapes",
    n: int = 1000,
    split: str = "test",
    out: str | Path | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, Any]:
    """Recall@K both ways, ranks, and (on ShapesWorld) semantic precision@K; writes report + plots to ``out``."""
    t0 = time.perf_counter()
    ds = retrieval_set(data, n, split, shapes_config_of(embedder))
    texts = [c for caps in ds.captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps])
    img_emb = embed_images(embedder, ds.images, progress=progress)
    txt_emb = embed_texts(embedder, texts)
    metrics = retrieval_metrics(img_emb, txt_emb, text_image, ks)
    if ds.scenes is not None and ds.meanings is not None:
        flat_meanings = [m for ms in ds.meanings for m in ms]
        sem = semantic_precision(
            img_emb,
            txt_emb,
            lambda t, i: satisfies(ds.scenes[i], flat_meanings[t]),
            ks,
            groups=[caption_kind(m) for m in flat_meanings],
        )
        by_kind = {
            "semantic_P@1": sem.pop("semantic_P@1_by"),
            "texts": sem.pop("texts_by"),
            "top1_misses": top1_misses(img_emb, txt_emb, ds.scenes, flat_meanings),
        }
        metrics.update(sem)
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    report = {
        "task": "retrieval",
        "model": getattr(embedder, "name", "?"),
        "data": ds.source,
        "n_images": len(ds.images),
        "n_texts": len(texts),
        "metrics": metrics,
        "captions_unique_fraction": sum(counts[t] == 1 for t in texts) / max(1, len(texts)),
        **({"by_caption_kind": by_kind} if ds.scenes is not None and ds.meanings is not None else {}),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        out = Path(out)
        n_show = min(10, len(ds.images))
        first = [caps[0] for caps in ds.captions[:n_show]]
        sim = (img_emb[:n_show] @ embed_texts(embedder, first).t()).numpy()
        report["plots"] = {
            "similarity": str(plots.plot_similarity(sim, ds.images[:n_show], first, out / "similarity.png")),
            "recall": str(plots.plot_recall(metrics, out / "retrieval.png", title=f"retrieval: {ds.source}")),
        }
    return report


def top1_misses(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scenes: Sequence[Scene], meanings: Sequence[dict]
) -> dict[str, dict[str, int]]:
    """For each caption kind, why the top-1 image is false of the caption, counted over the captions
    whose top-1 image is wrong (reasons from :func:`~mmfusion.data.shapes.why_false`, most frequent first)."""
    top1 = torch.cat([(text_emb[s : s + CHUNK] @ image_emb.t()).argmax(dim=1) for s in range(0, len(text_emb), CHUNK)])
    out: dict[str, dict[str, int]] = {}
    for meaning, i in zip(meanings, top1.tolist()):
        reason = why_false(scenes[i], meaning)
        if reason is not None:
            kind = out.setdefault(caption_kind(meaning), {})
            kind[reason] = kind.get(reason, 0) + 1
    order = {r: n for n, r in enumerate(MISS_REASONS)}
    return {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], order[kv[0]]))) for k, v in sorted(out.items())}


@dataclass
class ZeroShotGroup:
    name: str  # seen, heldout, all
    images: np.ndarray
    labels: np.ndarray  # into the class list


def zeroshot_groups(
    data: str, per_class: int, shapes: ShapesConfig | None = None
) -> tuple[list[str], list[ZeroShotGroup], list[str], str]:
    """Classes, image groups, highlighted (held-out) classes and a description."""
    if data == "shapes":
        world = ShapesWorld(shapes)
        classes = world.combos("all")
        groups = []
        for which in ("seen", "heldout"):
            items = world.classification_set(which, per_class)
            groups.append(
                ZeroShotGroup(
                    which,
                    np.stack([np.asarray(world.render(s)) for s, _ in items]),
                    np.asarray([classes.index(lbl) for _, lbl in items]),
                )
            )
        return classes, groups, world.combos("heldout"), f"ShapesWorld single objects, {per_class} per class"
    root = Path(data)
    parts = (
        [root / "zeroshot" / w for w in ("seen", "heldout")]
        if (root / "zeroshot" / "seen").is_dir()
        else [root / w for w in ("seen", "heldout")]
        if (root / "seen").is_dir()
        else [root]
    )
    folders = [
        ClassFolder.load(p, _eval_size(q for q in sorted(p.rglob("*")) if q.is_file())) for p in parts if p.is_dir()
    ]
    classes = sorted({c for f in folders for c in f.classes})
    groups = [
        ZeroShotGroup(
            f.root.name if len(folders) > 1 else "all",
            f.images,
            np.asarray([classes.index(f.classes[k]) for k in f.labels]),
        )
        for f in folders
    ]
    highlighted = folders[1].classes if len(folders) > 1 else []
    return classes, groups, highlighted, str(root)


def evaluate_zeroshot(
    embedder: Embedder,
    data: str = "shapes",
    per_class: int = 50,
    templates: tuple[str, ...] | list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1/top-5 over all classes with a prompt ensemble, per group (seen and held-out combinations)."""
    t0 = time.perf_counter()
    classes, groups, highlighted, source = zeroshot_groups(data, per_class, shapes_config_of(embedder))
    templates = tuple(templates or (SHAPES_TEMPLATES if data == "shapes" or highlighted else PHOTO_TEMPLATES))
    cls_emb = class_embeddings(embedder, classes, templates)
    single = class_embeddings(embedder, classes, templates[:1])
    report: dict[str, Any] = {
        "task": "zeroshot",
        "model": getattr(embedder, "name", "?"),
        "data": source,
        "classes": classes,
        "templates": list(templates),
        "groups": {},
    }
    all_pred, all_true = [], []
    for g in groups:
        emb = embed_images(embedder, g.images, progress=progress)
        labels = torch.as_tensor(g.labels)
        logits = emb @ cls_emb.t()
        res = topk_accuracy(logits, labels)
        res["top1_single_template"] = topk_accuracy(emb @ single.t(), labels, (1,))["top1"]
        pred = logits.argmax(dim=1).numpy()
        if all(len(c.split()) == 2 for c in classes):  # "colour shape": which half was right
            res["colour_acc"] = float(
                np.mean([classes[p].split()[0] == classes[t].split()[0] for p, t in zip(pred, g.labels)])
            )
            res["shape_acc"] = float(
                np.mean([classes[p].split()[1] == classes[t].split()[1] for p, t in zip(pred, g.labels)])
            )
        res["n"] = len(g.labels)
        report["groups"][g.name] = res
        all_pred.append(pred)
        all_true.append(g.labels)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        cm = confusion_matrix(np.concatenate(all_pred), np.concatenate(all_true), len(classes))
        report["plots"] = {
            "confusion": str(
                plots.plot_confusion(
                    cm,
                    classes,
                    Path(out) / "zeroshot_confusion.png",
                    highlight=highlighted,
                    title="zero-shot confusion (held-out classes in red)" if highlighted else "zero-shot confusion",
                )
            )
        }
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, report)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines for the terminal."""
    lines = [f"{report['task']} of {report['model']} on {report['data']}"]
    if report["task"] == "retrieval":
        m = report["metrics"]
        ks = sorted({int(k.split("@")[1]) for k in m if k.startswith("i2t_R@")})
        lines.append("  " + "  ".join(f"R@{k}" for k in ks).rjust(8 + 7 * len(ks)))
        for p, name in (("i2t", "image→text"), ("t2i", "text→image")):
            lines.append(
                f"  {name:11s}"
                + "".join(f"{m[f'{p}_R@{k}']:7.3f}" for k in ks)
                + f"   mean rank {m[f'{p}_mean_rank']:.1f}"
            )
        if "semantic_P@1" in m:
            lines.append(
                "  semantic  "
                + "".join(f"{m.get(f'semantic_P@{k}', float('nan')):7.3f}" for k in ks)
                + "   (precision@K: retrieved images the caption is true of)"
            )
        if "by_caption_kind" in report:
            kinds = report["by_caption_kind"]
            lines.append(
                "  semantic P@1 by caption kind: "
                + ", ".join(f"{k} {v:.2f} (n={kinds['texts'][k]})" for k, v in kinds["semantic_P@1"].items())
            )
            for kind, reasons in kinds.get("top1_misses", {}).items():
                lines.append(
                    f"    why the top-1 image is wrong, {kind}: " + ", ".join(f"{r} {n}" for r, n in reasons.items())
                )
        lines.append(
            f"  {report['n_images']} images, {report['n_texts']} captions "
            f"({report['captions_unique_fraction']:.0%} of captions unique: exact-pair R@1 is capped by it)"
        )
    else:
        for name, g in report["groups"].items():
            extra = f"  colour {g['colour_acc']:.3f}  shape {g['shape_acc']:.3f}" if "colour_acc" in g else ""
            lines.append(
                f"  {name:8s} top-1 {g['top1']:.3f}  top-5 {g['top5']:.3f}  "
                f"(one template: {g['top1_single_template']:.3f}){extra}  n={g['n']}"
            )
        lines.append(f"  over {len(report['classes'])} classes, ensemble of {len(report['templates'])} templates")
    for path in report.get("plots", {}).values():
        lines.append(f"  plot: {path}")
    return lines


__all__ = ["evaluate_retrieval", "evaluate_zeroshot", "summary_lines", "write_report"]
