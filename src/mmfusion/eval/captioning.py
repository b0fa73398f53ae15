"""Captioning evaluation: BLEU-1..4 and CIDEr-D as the COCO caption evaluation computes them, and a ShapesWorld check.

The metrics live in :mod:`mmfusion.eval.text_metrics` (re-exported here); the run over a data set, the report
and its files are :func:`mmfusion.eval.generation.evaluate_generation`'s, shared with VQA.

On ShapesWorld every caption can also be checked against the scene: :func:`caption_attribute_accuracy`
asks whether a caption names each object by its colour and its shape, and nothing that is not there.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.shapes import COLOURS, NUMBER_WORDS, SHAPES, SIZES, Scene, ShapesConfig
from .generation import GenerationTask, Scored, batched, evaluate_generation, open_images, readable_images, sample_sheet
from .text_metrics import BleuScore, CiderScore, bleu, cider, tokenize

# ---------------------------------------------------------------------------------------------------
# ShapesWorld: does the caption name every object by colour and shape?

# Words a caption may use for ShapesWorld's colours and shapes besides their own names.
COLOUR_WORDS: dict[str, str] = {**{c: c for c in COLOURS}, "violet": "purple"}
SHAPE_WORDS: dict[str, str] = {
    **{s: s for s in SHAPES},
    **{s + ("es" if s.endswith("s") else "s"): s for s in SHAPES},  # plurals: circles, crosses
    "rhombus": "diamond",
    "rhombuses": "diamond",
    "disc": "circle",
    "discs": "circle",
    "disk": "circle",
    "disks": "circle",
    "plus": "cross",
}
_PLURAL_SHAPES = {w for w, s in SHAPE_WORDS.items() if w != s and w.endswith("s") and w not in ("plus", "rhombus")}
_GENERIC = {"object": False, "objects": True, "shape": False, "shapes": True, "thing": False, "things": True}
_NUMBERS = {**{w: k for k, w in NUMBER_WORDS.items()}, "four": 4, "five": 5, "six": 6, **{str(k): k for k in range(10)}}
_MODIFIERS = set(SIZES) | {"big", "tiny", "little", "medium"}


@dataclass(frozen=True)
class Mention:
    """One noun phrase of a caption that refers to objects."""

    colour: str | None
    shape: str | None
    count: int | None  # None: a plural with no number ("red circles"), at least two
    definite: bool  # "the ...": may name an object named in an earlier sentence
    sentence: int = 0  # which sentence of the caption (split at . ; ! ?)


def mentions(caption: str) -> list[Mention]:
    """Noun phrases naming objects, read generously: "a small red circle", "two blue stars", "the disc".

    A phrase is a run of modifiers (sizes, colours, numbers) ending in a shape word or a generic noun
    ("object", "shape"); any other word in between ends the run, so the colour of "red on the left" binds
    to nothing. Phrases that name neither a colour nor a shape ("three shapes") only count, and are left out.
    """
    found: list[Mention] = []
    colour: str | None = None
    number: int | None = None
    definite = False
    sentence = 0
    for w in re.findall(r"[a-z0-9]+|[.;!?]", caption.lower()):
        if w in ".;!?":
            sentence += 1
            colour, number, definite = None, None, False
        elif w in COLOUR_WORDS:
            colour = COLOUR_WORDS[w]
        elif w in _NUMBERS:
            number = _NUMBERS[w]
        elif w in _MODIFIERS:
            pass
        elif w in SHAPE_WORDS or w in _GENERIC:
            shape = SHAPE_WORDS.get(w)
            plural = w in _PLURAL_SHAPES or _GENERIC.get(w, False)
            if colour or shape:
                count = number if number is not None else (None if plural else 1)
                found.append(Mention(colour, shape, count, definite and number is None, sentence))
            colour, number, definite = None, None, False
        else:
            colour, number = None, None
            definite = w == "the"
    return found


@dataclass
class AttributeCheck:
    correct: bool
    missing: list[str]  # objects of the scene the caption does not name by colour and shape
    wrong: list[str]  # what the caption names that the scene does not hold (or only by colour or shape)


def check_caption(caption: str, scene: Scene) -> AttributeCheck:
    """Whether ``caption`` names every object of ``scene`` by its colour and shape, and no object it lacks.

    Each indefinite phrase ("a red circle", "two blue stars") names new objects, and so does every phrase
    of one sentence ("the red circle is left of the red circle" names two); a definite phrase may instead
    refer back to an object named in an earlier sentence with matching words ("... a red circle. The
    circle is small."). A phrase missing the colour or the shape of its object does not name it. Sizes,
    positions and counts are not checked.
    """
    named: list[Mention] = []
    for m in mentions(caption):
        if m.definite:
            k = next((k for k, e in enumerate(named) if e.sentence < m.sentence and _agrees(m, e)), None)
            if k is not None:
                e = named[k]
                named[k] = Mention(e.colour or m.colour, e.shape or m.shape, e.count, False, e.sentence)
                continue
        named.append(m)
    have = Counter((o.colour, o.shape) for o in scene.objects)
    wrong: list[str] = []
    for m in sorted(named, key=lambda m: m.count is None):  # numbered phrases first; plurals take what is left
        key, left = (m.colour, m.shape), have[(m.colour, m.shape)] if m.colour and m.shape else 0
        take = m.count if m.count is not None else (left if left >= 2 else 2)
        if take <= left:
            have[key] -= take
        else:
            wrong.append(f"{m.colour or '?'} {m.shape or '?'}" + (f" x{take}" if take != 1 else ""))
    missing = [f"{c} {s}" for (c, s), k in sorted(have.items()) for _ in range(k)]
    return AttributeCheck(not missing and not wrong, missing, wrong)


def _agrees(m: Mention, earlier: Mention) -> bool:
    return all(a is None or b is None or a == b for a, b in ((m.colour, earlier.colour), (m.shape, earlier.shape)))


@dataclass
class AttributeAccuracy:
    accuracy: float  # fraction of captions with every object named right and nothing wrong
    checks: list[AttributeCheck] = field(repr=False)
    missing_rate: float  # fraction of captions that leave out (or half-name) an object
    wrong_rate: float  # fraction of captions that name an object the scene does not hold


def caption_attribute_accuracy(captions: Sequence[str], scenes: Sequence[Scene]) -> AttributeAccuracy:
    """Fraction of captions that name the colour and shape of every object of their scene, and nothing more."""
    if len(captions) != len(scenes):
        raise ValueError(f"one caption per scene is needed; got {len(captions)} captions for {len(scenes)} scenes")
    checks = [check_caption(c, s) for c, s in zip(captions, scenes)]
    k = max(1, len(checks))
    return AttributeAccuracy(
        sum(c.correct for c in checks) / k if checks else float("nan"),
        checks,
        sum(bool(c.missing) for c in checks) / k,
        sum(bool(c.wrong) for c in checks) / k,
    )


# ---------------------------------------------------------------------------------------------------
# Evaluation end to end


@dataclass
class CaptionSet:
    images: list[Image.Image | Path]  # in memory (ShapesWorld), or files decoded a batch at a time
    references: list[list[str]]  # per image
    scenes: list[Scene] | None  # when the attributes are known (ShapesWorld, or an export of it)
    names: list[str]  # per image: its file, or "split/index"
    source: str


def caption_set(data: str, n: int, split: str = "test", shapes: ShapesConfig | None = None) -> CaptionSet:
    """The first ``n`` images of a ShapesWorld split (``data="shapes"``) or of a caption folder (0: all)."""
    from ..data.datasets import DataFormatError, read_captions
    from ..data.shapes import ShapesWorld
    from .report import scenes_for, split_folder

    if data == "shapes":
        world = ShapesWorld(shapes)
        samples = [world.sample(split, i) for i in range(n)]
        return CaptionSet(
            [s.image for s in samples],
            [[c.text for c in s.captions] for s in samples],
            [s.scene for s in samples],
            [f"{split}/{i}" for i in range(n)],
            f"ShapesWorld {split} split, {n} scenes",
        )
    root = split_folder(data, split, "captions.jsonl")
    records = read_captions(root)[:n] if n else read_captions(root)
    ok = readable_images(root, [r.image for r in records])
    kept = [r for r in records if r.image in ok]
    if not kept:
        raise DataFormatError(f"{root}: none of the {len(records)} images could be read")
    scenes = scenes_for(root, [r.image for r in kept])
    return CaptionSet(
        [root / r.image for r in kept],
        [r.captions for r in kept],
        scenes,
        [r.image for r in kept],
        f"{root} ({len(kept)} images)",
    )


def evaluate_captioner(
    captioner: Any,
    data: str = "shapes",
    n: int = 500,
    out: str | Path | None = None,
    split: str = "test",
    options: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    samples: int = 12,
) -> dict[str, Any]:
    """BLEU-1..4, CIDEr-D and (on ShapesWorld) attribute accuracy of a captioner's captions of ``n`` images.

    Args:
        captioner: anything with ``caption(images, **options) -> list[str]`` (a :class:`Captioner`).
        data: ``"shapes"`` or a folder with ``images/`` + ``captions.jsonl`` (an export's split folder, or
            its root with ``split`` beneath). Its ``scenes.jsonl``, when present, enables the attribute check.
        n: images to caption (0: all of a folder).
        out: when given, ``captioning.json``, ``captioning_scores.png`` and ``captioning_samples.png`` go there.
        options: generation options passed to every ``caption`` call (``num_beams=3``...).
        samples: images on the sample sheet.

    Returns:
        The report: corpus metrics, settings, and per image its caption and scores.
    """
    task = GenerationTask(
        "captioning", "caption", caption_set, lambda ds: (), lambda ds, captions: _score(ds, captions, samples)
    )
    return evaluate_generation(task, captioner, data, n, out, split, options, batch_size)


def _score(ds: CaptionSet, captions: list[str], samples: int) -> Scored:
    """Corpus and per-image scores of the captions of ``ds``, and the plots to draw of them."""
    cands = dict(enumerate(captions))
    refs = dict(enumerate(ds.references))
    b, c = bleu(cands, refs), cider(cands, refs)
    metrics: dict[str, float] = {**b.as_dict(), "CIDEr": c.score}
    attrs = caption_attribute_accuracy(captions, ds.scenes) if ds.scenes is not None else None
    if attrs is not None:
        metrics.update(
            attribute_accuracy=attrs.accuracy,
            attribute_missing_rate=attrs.missing_rate,
            attribute_wrong_rate=attrs.wrong_rate,
        )
    per_image = []
    for i, cap in enumerate(captions):
        row: dict[str, Any] = {
            "image": ds.names[i],
            "caption": cap,
            "BLEU-4": b.per_image[i][-1],
            "CIDEr": c.per_image[i],
        }
        if attrs is not None:
            chk = attrs.checks[i]
            row.update(attributes_correct=chk.correct, missing=chk.missing, wrong=chk.wrong)
        per_image.append(row)

    def plots(out: Path, report: dict[str, Any]) -> dict[str, Path]:
        k = min(samples, len(captions))
        lines = [_caption_lines(captions[i], ds.references[i], attrs.checks[i] if attrs else None) for i in range(k)]
        return {
            "scores": plot_caption_scores(b, c, out / "captioning_scores.png", title=_title(report)),
            "samples": sample_sheet(
                open_images(ds.images[:k]),
                lines,
                out / "captioning_samples.png",
                title=f"{report['model']}: generated captions (first reference below)",
            ),
        }

    details = {
        "length_ratio": b.ratio,
        "tokenizer": "mmfusion.eval.text_metrics.tokenize (COCO-style: lower case, punctuation dropped)",
    }
    return Scored(metrics, details, "per_image", per_image, plots)


def _title(report: dict[str, Any]) -> str:
    m = report["metrics"]
    extra = f", attributes {m['attribute_accuracy']:.2f}" if "attribute_accuracy" in m else ""
    return f"{report['model']} on {report['data']}: BLEU-4 {m['BLEU-4']:.3f}, CIDEr {m['CIDEr']:.3f}{extra}"


def _caption_lines(caption: str, refs: Sequence[str], check: AttributeCheck | None) -> list[tuple[str, str]]:
    mark = "" if check is None else (" ✓" if check.correct else " ✗")
    colour = "#1f4e79" if check is None else ("#1e7b34" if check.correct else "#b03a2e")
    return [(f"model: {caption}{mark}", colour), (f"ref: {refs[0]}", "#555555")]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines for the terminal."""
    m = report["metrics"]
    lines = [
        f"captioning of {report['model']} on {report['data']}",
        "  " + "  ".join(f"{k} {m[k]:.3f}" for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr")),
    ]
    if "attribute_accuracy" in m:
        lines.append(
            f"  attribute accuracy {m['attribute_accuracy']:.3f} (captions naming every object's colour and shape; "
            f"{m['attribute_missing_rate']:.0%} miss one, {m['attribute_wrong_rate']:.0%} name one that is not there)"
        )
    lines += [f"  plot: {p}" for p in report.get("plots", {}).values()]
    return lines


# ---------------------------------------------------------------------------------------------------
# Plots


def plot_caption_scores(b: BleuScore, c: CiderScore, path: str | Path, title: str = "") -> Path:
    """Histograms of the per-image BLEU-4 and CIDEr-D, the corpus value marked."""
    from .plots import _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, values, corpus, name in (
        (axes[0], [s[-1] for s in b.per_image.values()], b.scores[-1], f"BLEU-{len(b.scores)}"),
        (axes[1], list(c.per_image.values()), c.score, "CIDEr-D"),
    ):
        ax.hist(values, bins=min(30, max(5, len(values) // 4)), color="#2e86c1", alpha=0.85)
        ax.axvline(corpus, color="#c0392b", lw=1.5, ls="--", label=f"corpus {corpus:.3f}")
        ax.set_xlabel(f"per-image {name}")
        ax.set_ylabel("images")
        ax.legend(frameon=False, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


__all__ = [
    "BleuScore",
    "CiderScore",
    "batched",
    "bleu",
    "cider",
    "tokenize",
    "caption_attribute_accuracy",
    "check_caption",
    "mentions",
    "evaluate_captioner",
    "open_images",
    "readable_images",
    "summary_lines",
    "sample_sheet",
]
