"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4 and CIDEr-D, and a ShapesWorld check.

BLEU (Papineni et al., 2002) and CIDEr-D (Vedantam et al., 2015) follow the COCO caption toolkit
(``pycocoevalcap``) line for line in what they count, so our numbers can be set beside published ones; the
tests compare both scorers with that package on hand-made corpora. The toolkit's scorers are plain Python,
but it tokenises with the Java PTB tokenizer; :func:`tokenize` is our Python stand-in for that step.

On ShapesWorld every caption can also be checked against the scene: :func:`caption_attribute_accuracy`
asks whether a caption names each object by its colour and its shape, and nothing that is not there.
"""

from __future__ import annotations

import logging
import math
import re
import textwrap
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.shapes import COLOURS, NUMBER_WORDS, SHAPES, SIZES, Scene, ShapesConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Tokenisation

_WORD = re.compile(r"\w+(?:['\-]\w+)*(?:[.,]\d+)*|'(?:s|re|ve|ll|d|m)\b|n't\b")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def tokenize(text: str) -> list[str]:
    """Words of a caption as the COCO caption evaluation sees them: lower-cased, punctuation dropped.

    The toolkit runs the Stanford PTB tokenizer (Java) with lower-casing and then drops the punctuation
    tokens. We keep what matters for n-gram counts the same way: words, numbers (``3.5``, ``1,000``) and
    hyphenated words stay whole, and clitics are split off as PTB does (``don't`` -> ``do n't``,
    ``dog's`` -> ``dog 's``). PTB does a few more things we do not: it splits some fused words
    (``cannot`` -> ``can not``, ``gonna`` -> ``gon na``), keeps URLs and emoticons as tokens, and reads a
    few abbreviations (``Mr.``) with their period. Captions of that kind may tokenise differently, so
    scores on them can differ slightly from the Java pipeline; scores on the same tokens are identical.
    Applying it twice gives the same tokens.
    """
    words: list[str] = []
    for w in _WORD.findall(text.lower()):
        m = _CLITIC.match(w)
        words.extend(m.groups() if m else (w,))
    return words


def _prepare(text: str, tokenized: bool) -> list[str]:
    return text.split() if tokenized else tokenize(text)


def _check_keys(candidates: Mapping, references: Mapping) -> list:
    if set(candidates) != set(references):
        alone = [str(k) for k in set(candidates) ^ set(references)]
        raise ValueError(
            f"candidates and references must have the same ids; {len(alone)} id(s) are in only one of them, "
            f"e.g. {sorted(alone)[:3]}"
        )
    empty = [k for k, refs in references.items() if isinstance(refs, str) or len(refs) == 0]
    if empty:
        raise ValueError(f"every id needs a list of one or more reference captions; not so for {empty[:3]}")
    if not candidates:
        raise ValueError("no captions to score")
    return list(candidates)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram of ``words``."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# ---------------------------------------------------------------------------------------------------
# BLEU

_TINY, _SMALL = 1e-15, 1e-9  # the toolkit's guards: a zero count gives a tiny precision, never a zero division


@dataclass
class BleuScore:
    """BLEU-1..n over a corpus and per image."""

    scores: list[float]  # BLEU-1, ..., BLEU-n of the corpus
    per_image: dict[Hashable, list[float]]  # the same, computed on each image alone
    ratio: float  # candidate length / effective reference length, over the corpus
    candidate_length: int
    reference_length: int

    def as_dict(self) -> dict[str, float]:
        return {f"BLEU-{k + 1}": s for k, s in enumerate(self.scores)}


def _bleu_from_counts(correct: Sequence[float], guess: Sequence[float], cand_len: float, ref_len: float) -> list[float]:
    """Cumulative BLEU-1..n from clipped matches and n-gram counts, with the brevity penalty."""
    out, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess)):
        product *= (c + _TINY) / (g + _SMALL)
        out.append(product ** (1 / (k + 1)))
    ratio = (cand_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    tokenized: bool = False,
) -> BleuScore:
    """Corpus BLEU-1..n as the COCO caption toolkit computes it, plus per-image scores.

    For each image the candidate's n-gram counts are clipped by the most any one reference holds; the
    clipped matches and the candidate n-gram counts are summed over the corpus. The effective reference
    length of an image is that of the reference closest in length to the candidate (the shorter on a
    tie), summed over the corpus for one brevity penalty. BLEU-k is the geometric mean of the 1..k
    precisions, each guarded as ``(matches + 1e-15) / (count + 1e-9)``: a precision with no match is
    about 1e-6 rather than zero, so BLEU-4 of a short caption is small but not 0.

    Args:
        candidates: id -> generated caption.
        references: id -> one or more reference captions.
        n: the longest n-gram.
        tokenized: the texts are already tokenised (words separated by spaces); else :func:`tokenize` them.
    """
    ids = _check_keys(candidates, references)
    correct_total, guess_total = [0] * n, [0] * n
    cand_total = ref_total = 0
    per_image: dict[Hashable, list[float]] = {}
    for i in ids:
        cand = _prepare(candidates[i], tokenized)
        refs = [_prepare(r, tokenized) for r in references[i]]
        max_ref: Counter = Counter()
        for r in refs:
            max_ref |= _ngrams(r, n)  # element-wise maximum
        counts = _ngrams(cand, n)
        correct = [0] * n
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        guess = [max(0, len(cand) - k) for k in range(n)]
        ref_len = min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        per_image[i] = _bleu_from_counts(correct, guess, len(cand), ref_len)
        correct_total = [a + b for a, b in zip(correct_total, correct)]
        guess_total = [a + b for a, b in zip(guess_total, guess)]
        cand_total += len(cand)
        ref_total += ref_len
    scores = _bleu_from_counts(correct_total, guess_total, cand_total, ref_total)
    ratio = (cand_total + _TINY) / (ref_total + _SMALL)
    return BleuScore(scores, per_image, ratio, cand_total, ref_total)


# ---------------------------------------------------------------------------------------------------
# CIDEr-D


@dataclass
class CiderScore:
    score: float  # mean over images
    per_image: dict[Hashable, float]


def _tfidf(counts: Counter, idf: dict, log_images: float, n: int) -> tuple[list[dict], list[float]]:
    """Per n-gram order: the TF-IDF vector and its norm. N-grams no reference holds get the highest weight."""
    vecs: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_images - idf.get(gram, 0.0))
    return vecs, [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]


def cider(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenized: bool = False,
) -> CiderScore:
    """CIDEr-D as the COCO caption toolkit computes it (the toolkit's "CIDEr" is this CIDEr-D).

    Each sentence becomes a TF-IDF vector per n-gram order (1..n), the document frequency of an n-gram
    being the number of images among the evaluated ones whose references hold it. For each reference the
    candidate scores the cosine similarity per order, with the candidate's weights clipped at the
    reference's (so repeating a word gains nothing), times a Gaussian penalty on the length difference
    ``exp(-delta^2 / (2 sigma^2))``. The image's score is the mean over orders and references, times 10.

    The toolkit measures sentence length for the penalty as its number of bigrams (words - 1, and 0 for
    an empty sentence); we do the same so that the numbers match. It changes nothing unless a sentence
    is empty.

    Because document frequencies come from the evaluated set, a corpus of one image scores 0 and scores
    of different sets are not comparable unless the sets are the same.
    """
    ids = _check_keys(candidates, references)
    cands = {i: _ngrams(_prepare(candidates[i], tokenized), n) for i in ids}
    refs = {i: [_ngrams(_prepare(r, tokenized), n) for r in references[i]] for i in ids}
    df: Counter = Counter()
    for i in ids:
        df.update({g for r in refs[i] for g in r})
    idf = {g: math.log(max(1.0, d)) for g, d in df.items()}
    log_images = math.log(len(ids))

    def length(counts: Counter) -> int:
        return sum(c for g, c in counts.items() if len(g) == 2) if n >= 2 else 0

    penalty_denominator = 2 * sigma**2
    per_image: dict[Hashable, float] = {}
    for i in ids:
        vec, norm = _tfidf(cands[i], idf, log_images, n)
        total = np.zeros(n)
        for ref in refs[i]:
            rvec, rnorm = _tfidf(ref, idf, log_images, n)
            penalty = math.exp(-((length(cands[i]) - length(ref)) ** 2) / penalty_denominator)
            for k in range(n):
                dot = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and rnorm[k]:
                    dot /= norm[k] * rnorm[k]
                total[k] += dot * penalty
        per_image[i] = float(total.mean() / len(refs[i]) * 10.0)
    return CiderScore(float(np.mean(list(per_image.values()))), per_image)


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


def readable_images(root: Path, files: Sequence[str]) -> set[str]:
    """The files under ``root`` that decode; the others are named in the log. Nothing is kept in memory."""
    from ..data.images import ImageDecodeError, load_image

    ok, skipped = set(), []
    for f in dict.fromkeys(files):
        try:
            load_image(root / f).close()
            ok.add(f)
        except ImageDecodeError as e:
            skipped.append(f"{f} ({e})")
    if skipped:
        log.warning("%s: skipped %d unreadable image(s): %s", root, len(skipped), "; ".join(skipped[:10]))
    return ok


def open_images(items: Sequence[Image.Image | Path]) -> list[Image.Image]:
    """Images as given, files decoded (with the checks of :func:`mmfusion.data.images.load_image`), each once."""
    from ..data.images import load_image

    files = {p: load_image(p) for p in dict.fromkeys(im for im in items if not isinstance(im, Image.Image))}
    return [im if isinstance(im, Image.Image) else files[im] for im in items]


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
    from .report import shapes_config_of, write_report

    t0 = time.perf_counter()
    options = dict(options or {})
    ds = caption_set(data, n, split, shapes_config_of(captioner) if data == "shapes" else None)
    captions = batched(lambda ims: captioner.caption(open_images(ims), **options), batch_size, ds.images)
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
    report: dict[str, Any] = {
        "task": "captioning",
        "model": getattr(captioner, "name", "?"),
        "data": ds.source,
        "n": len(captions),
        "options": options,
        "metrics": metrics,
        "length_ratio": b.ratio,
        "tokenizer": "mmfusion.eval.captioning.tokenize (COCO-style: lower case, punctuation dropped)",
        "seconds": round(time.perf_counter() - t0, 2),
        "per_image": per_image,
    }
    if out is not None:
        out = Path(out)
        k = min(samples, len(captions))
        report["plots"] = {
            "scores": str(plot_caption_scores(b, c, out / "captioning_scores.png", title=_title(report))),
            "samples": str(
                sample_sheet(
                    open_images(ds.images[:k]),
                    [
                        _caption_lines(captions[i], ds.references[i], attrs.checks[i] if attrs else None)
                        for i in range(k)
                    ],
                    out / "captioning_samples.png",
                    title=f"{report['model']}: generated captions (first reference below)",
                )
            ),
        }
        write_report(report, out / "captioning.json")
    return report


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


__all__ = [
    "bleu",
    "cider",
    "tokenize",
    "caption_attribute_accuracy",
    "check_caption",
    "mentions",
    "evaluate_captioner",
    "summary_lines",
    "sample_sheet",
]
