"""A compositional benchmark: does a model prefer the true caption to a minimally edited false one?

As ARO (Yuksekgonul et al., ICLR 2023) and SugarCrepe (Hsieh et al., NeurIPS 2023) measure it: each
test is one pair, a true caption against one hard negative of a given type (attributes of two objects
swapped, a relation's order swapped, one attribute replaced, a count changed; see
:mod:`mmfusion.data.negatives`), and the accuracy of a type is the fraction of pairs the model gets
right, so chance is 0.5. On ShapesWorld the same is asked the other way, text to image: the caption
against its own image and a minimally changed one of which it is false (two objects' colours swapped,
the objects of a relation swapping places). A tie counts half, so a model that cannot tell scores chance.

Anything with a :class:`Scorer`'s ``score`` can be measured; an :class:`~mmfusion.interfaces.Embedder` is
scored by cosine similarity (:class:`EmbedderScorer`). :class:`OracleScorer` (the truth, from the scene)
scores 1.0 and :class:`RandomScorer` 0.5, the two ends of the scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..data.negatives import NEGATIVE_TYPES, TEXT_TYPES, caption_negatives, changed_scenes, text_negatives
from ..data.scene import Scene
from ..data.shapes import SPLITS, ShapesConfig, ShapesWorld, render_image, satisfies
from ..interfaces import Embedder
from . import plots
from .report import retrieval_set, shapes_config_of
from .retrieval import embed_images, embed_texts

CHANCE = 0.5  # every test is one true pair against one false pair
DIRECTIONS = {"i2t": "image→text", "t2i": "text→image"}


@dataclass(frozen=True)
class Item:
    """One test: the true (image, text) pair must score above the false one.

    Image to text: the same image with a negative caption; text to image: the same caption with a changed image.
    """

    kind: str  # a key of NEGATIVE_TYPES
    direction: str  # i2t or t2i
    true: tuple[int, int]  # (image index, text index)
    false: tuple[int, int]


@dataclass
class CompositionSet:
    """The images and texts of a benchmark and the tests over them.

    Images are ShapesWorld scenes (rendered when a model needs pixels) or decoded images from a folder.
    """

    texts: list[str] = field(default_factory=list)
    meanings: list[dict | None] = field(default_factory=list)  # per text, None when unknown
    scenes: list[Scene] = field(default_factory=list)  # per image, ShapesWorld
    images: np.ndarray | None = None  # (N, S, S, 3) uint8 from a folder; None: render the scenes
    shapes: ShapesConfig | None = None  # how scenes are rendered
    items: list[Item] = field(default_factory=list)
    examples: dict[str, dict[str, str]] = field(default_factory=dict)  # one of each type, in words
    source: str = ""
    checked: bool = True  # whether each negative was checked false against its scene

    def add_text(self, text: str, meaning: dict | None = None) -> int:
        self.texts.append(text)
        self.meanings.append(meaning)
        return len(self.texts) - 1

    def add_scene(self, scene: Scene) -> int:
        self.scenes.append(scene)
        return len(self.scenes) - 1

    def pixels(self) -> np.ndarray:
        """(N, S, S, 3) uint8: the folder's images, or the scenes rendered as ShapesWorld renders them."""
        if self.images is not None:
            return self.images
        cfg = self.shapes or ShapesConfig()
        return np.stack([np.asarray(render_image(s, cfg.image_size, cfg.supersample)) for s in self.scenes])


class Scorer(Protocol):
    """Scores (image, text) pairs of a benchmark: higher means the text fits the image better."""

    def score(self, data: CompositionSet, pairs: np.ndarray) -> np.ndarray:
        """(P,) scores of ``pairs``, (P, 2) rows of (image index, text index)."""
        ...


class EmbedderScorer:
    """Cosine similarity of an embedder's image and text embeddings (each image and text embedded once)."""

    def __init__(self, embedder: Embedder, progress: bool = False):
        self.embedder, self.progress = embedder, progress

    def score(self, data: CompositionSet, pairs: np.ndarray) -> np.ndarray:
        img = embed_images(self.embedder, data.pixels(), progress=self.progress)  # (N_img, D)
        txt = embed_texts(self.embedder, data.texts)  # (N_txt, D)
        return (img[pairs[:, 0]] * txt[pairs[:, 1]]).sum(dim=1).numpy()  # (P,)


class OracleScorer:
    """The truth from the scene's structure: 1 when the caption's meaning holds in the scene, else 0."""

    def score(self, data: CompositionSet, pairs: np.ndarray) -> np.ndarray:
        if not data.scenes or any(data.meanings[t] is None for t in pairs[:, 1]):
            raise ValueError("the oracle needs scenes and caption meanings (ShapesWorld), not a folder of captions")
        return np.array([float(satisfies(data.scenes[i], data.meanings[t] or {})) for i, t in pairs.tolist()])


class RandomScorer:
    """Independent uniform scores: chance, 0.5 on every type."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, data: CompositionSet, pairs: np.ndarray) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(pairs))


def _pick(options: Sequence, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def shapes_set(
    n: int,
    split: str = "test",
    shapes: ShapesConfig | None = None,
    seed: int = 0,
    kinds: Sequence[str] = tuple(NEGATIVE_TYPES),
) -> CompositionSet:
    """Tests over the first ``n`` scenes of a ShapesWorld split: for each scene and type, one negative caption
    (image to text) and one changed scene (text to image), each of a caption drawn among the scene's captions
    that have one.

    Outside the ``heldout`` split, no negative names and no changed scene holds a held-out combination, so
    every test stays within what the model was trained on.
    """
    cfg = shapes or ShapesConfig()
    world = ShapesWorld(cfg)
    avoid = () if split == "heldout" else tuple(cfg.heldout)
    data = CompositionSet(shapes=cfg, source=f"ShapesWorld {split} split, {n} scenes")
    for i in range(n):
        scene = world.scene(split, i)
        captions = world.captions(scene)
        rng = np.random.default_rng([seed, 23, SPLITS[split], i])
        img = data.add_scene(scene)
        for kind in kinds:
            negs = [(c, ns) for c in captions if (ns := caption_negatives(scene, c, [kind], avoid))]
            if negs:
                cap, ns = _pick(negs, rng)
                neg = _pick(ns, rng)
                t, f = data.add_text(cap.text, cap.meaning), data.add_text(neg.text, neg.meaning)
                data.items.append(Item(kind, "i2t", (img, t), (img, f)))
                data.examples.setdefault(kind, {}).setdefault("i2t", f"{cap.text!r} vs {neg.text!r}")
            changes = [(c, chs) for c in captions if (chs := changed_scenes(scene, c, rng, [kind], avoid))]
            if changes:
                cap, chs = _pick(changes, rng)
                ch = _pick(chs, rng)
                t = data.add_text(cap.text, cap.meaning)
                data.items.append(Item(kind, "t2i", (img, t), (data.add_scene(ch.scene), t)))
                data.examples.setdefault(kind, {}).setdefault("t2i", f"{cap.text!r}: its image vs {ch.what}")
    return data


def folder_set(data: str, n: int, split: str = "test", seed: int = 0) -> CompositionSet:
    """Image-to-text tests over a folder of captioned images (``captions.jsonl``): for each image and type, one
    negative made by word swaps from one of its captions (:func:`~mmfusion.data.negatives.text_negatives`)."""
    ds = retrieval_set(data, n, split)
    out = CompositionSet(images=ds.images, source=ds.source, checked=False)
    for i, captions in enumerate(ds.captions):
        rng = np.random.default_rng([seed, 23, i])
        for kind in TEXT_TYPES:
            negs = [(c, ns) for c in captions if (ns := text_negatives(c, [kind]))]
            if negs:
                cap, ns = _pick(negs, rng)
                neg = _pick(ns, rng)
                out.items.append(Item(kind, "i2t", (i, out.add_text(cap)), (i, out.add_text(neg.text))))
                out.examples.setdefault(kind, {}).setdefault("i2t", f"{cap!r} vs {neg.text!r}")
    return out


def pair_accuracy(true: np.ndarray, false: np.ndarray) -> np.ndarray:
    """1 where the true pair scores higher, 0 where lower, 0.5 for a tie (a model that cannot tell is at chance)."""
    return (true > false).astype(float) + 0.5 * (true == false)


def score_items(scorer: Scorer, data: CompositionSet) -> np.ndarray:
    """(len(items),) accuracy of each test under ``scorer``, scoring every pair in one call."""
    if not data.items:
        return np.zeros(0)
    pairs = np.array([it.true for it in data.items] + [it.false for it in data.items])  # (2 * items, 2)
    scores = np.asarray(scorer.score(data, pairs), dtype=float)
    return pair_accuracy(scores[: len(data.items)], scores[len(data.items) :])


def _cell(correct: np.ndarray) -> dict[str, Any]:
    n = len(correct)
    acc = float(correct.mean()) if n else float("nan")
    ci = 1.96 * math.sqrt(acc * (1 - acc) / n) if n else float("nan")  # normal approximation
    return {"accuracy": round(acc, 4), "n": n, "chance": CHANCE, "ci95": round(ci, 4)}


def composition_report(data: CompositionSet, correct: np.ndarray, name: str) -> dict[str, Any]:
    """The report: accuracy, n, chance and a 95% interval per type and direction, and their means."""
    kinds = list(dict.fromkeys(it.kind for it in data.items))
    types: dict[str, Any] = {}
    for kind in [k for k in NEGATIVE_TYPES if k in kinds]:
        types[kind] = {"description": NEGATIVE_TYPES[kind]}
        for d in DIRECTIONS:
            mask = np.array([it.kind == kind and it.direction == d for it in data.items])
            if mask.any():
                types[kind][d] = _cell(correct[mask])
    mean = {
        d: round(float(np.mean([t[d]["accuracy"] for t in types.values() if d in t])), 4)
        for d in DIRECTIONS
        if any(d in t for t in types.values())
    }
    return {
        "task": "composition",
        "model": name,
        "data": data.source,
        "chance": CHANCE,
        "negatives": "negatives checked false of each scene" if data.checked else "negatives by word swaps, unchecked",
        "types": types,
        "mean": mean,  # unweighted mean over types, as ARO and SugarCrepe average
        "examples": {k: data.examples[k] for k in types if k in data.examples},
    }


def evaluate_composition(
    model: Embedder | Scorer,
    data: str = "shapes",
    n: int = 500,
    split: str = "test",
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The compositional benchmark end to end; writes the bar plot to ``out`` when given.

    Args:
        model: an embedder (scored by cosine similarity) or a :class:`Scorer`.
        data: ``shapes`` (negatives from each scene's structure, both directions) or a folder with
            ``captions.jsonl`` (negatives by word swaps, image to text only).
        n: ShapesWorld scenes, or folder images (0: all).
        split: the ShapesWorld split (``test``, or ``heldout`` for scenes with held-out combinations), or the
            folder's subfolder.
        seed: which caption and which negative each test takes.

    Returns:
        The report of :func:`composition_report`, with ``seconds`` and ``plots``.
    """
    t0 = time.perf_counter()
    if data == "shapes":
        if n < 1:
            raise ValueError(f"--n must be at least 1 scene on ShapesWorld, got {n}")
        bench = shapes_set(n, split, shapes_config_of(model), seed)
    else:
        bench = folder_set(data, n, split, seed)
    if not bench.items:
        raise ValueError(
            f"no hard negative could be made from {bench.source}: word swaps need colour, shape, relation or "
            "number words in the captions (such as 'a red car left of a blue bus')"
        )
    scorer = EmbedderScorer(model, progress) if isinstance(model, Embedder) else model
    report = composition_report(bench, score_items(scorer, bench), getattr(model, "name", type(model).__name__))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        path = plots.plot_composition(
            report["types"], Path(out) / "composition.png", title=f"composition: {report['data']}", chance=CHANCE
        )
        report["plots"] = {"composition": str(path)}
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The per-type table for the terminal."""
    lines = [
        f"composition of {report['model']} on {report['data']}",
        f"  true caption vs one hard negative: accuracy (chance {report['chance']:.2f}); {report['negatives']}",
        "  " + "type".ljust(16) + "".join(name.rjust(22) for name in DIRECTIONS.values()),
    ]

    def cell(c: dict | None) -> str:
        return (f"{c['accuracy']:.3f} ±{c['ci95']:.3f} n={c['n']}" if c else "-").rjust(22)

    for kind, t in report["types"].items():
        lines.append("  " + kind.ljust(16) + "".join(cell(t.get(d)) for d in DIRECTIONS))
    lines.append(
        "  " + "mean of types".ljust(16)
        + "".join((f"{report['mean'][d]:.3f}" if d in report["mean"] else "-").rjust(22) for d in DIRECTIONS)
    )  # fmt: skip
    for path in report.get("plots", {}).values():
        lines.append(f"  plot: {path}")
    return lines


__all__ = [
    "CHANCE",
    "CompositionSet",
    "EmbedderScorer",
    "Item",
    "OracleScorer",
    "RandomScorer",
    "Scorer",
    "composition_report",
    "evaluate_composition",
    "folder_set",
    "score_items",
    "shapes_set",
    "summary_lines",
]
