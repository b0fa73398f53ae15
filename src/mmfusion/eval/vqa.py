"""VQA accuracy: exact match after the VQA evaluation's answer normalisation, overall and per question type.

The normalisation follows the official VQA evaluation (Antol et al., 2015; Goyal et al., 2017): punctuation
dropped or turned into spaces, periods dropped unless a digit follows, lower case, number words as digits,
articles dropped, common contractions given their apostrophe. Two differences, both on purpose: we always
normalise the reference answers too (the official script does so only when the annotators disagree), and
we strip every such period (the official script, through a misplaced argument, stops after 32).

With several reference answers per question (VQA v2 has ten) we also report the consensus accuracy of
VQA v2: ``min(#references equal to the prediction / 3, 1)``, averaged over the ten ways of leaving one
reference out. A question with a single reference answer (ShapesWorld) scores its exact match there.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.shapes import ShapesConfig
from .generation import GenerationTask, Scored, evaluate_generation, open_images, readable_images, sample_sheet

log = logging.getLogger(__name__)

# Characters the VQA evaluation removes (next to a space, or anywhere once a number like 1,000 occurs)
# or otherwise turns into a space. Periods, apostrophes and colons are not among them.
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_THOUSANDS = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Contractions, which answers often write without their apostrophe ("dont").
_CONTRACTED = (
    "ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't he'd he'll he's i'd i'll i'm "
    "i've isn't it'd it'll it's let's ma'am mightn't might've mustn't must've needn't shan't she'd she'll "
    "she's should've shouldn't that's there's they'd they'll they're they've wasn't we'd we'll we're we've "
    "weren't what's where's who'd who'll who's won't wouldn't would've y'all you'd you'll you're you've "
    "could've couldn't've wouldn't've shouldn't've o'clock"
)
CONTRACTIONS = {w.replace("'", ""): w for w in _CONTRACTED.split()}


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: ``"Two."`` -> ``"2"``, ``"The circle!"`` -> ``"circle"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _THOUSANDS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def consensus_score(prediction: str, references: Sequence[str]) -> float:
    """VQA v2 accuracy of one normalised prediction: min(matches / 3, 1) over each leave-one-out subset."""
    if len(references) == 1:
        return float(prediction == references[0])
    matches = sum(r == prediction for r in references)
    # leaving out a matching reference leaves matches - 1; leaving out another leaves matches
    return sum(min(1.0, (matches - (r == prediction)) / 3) for r in references) / len(references)


@dataclass
class VQAScores:
    accuracy: float  # exact match with the most common reference answer, after normalisation
    per_type: dict[str, float]
    counts: dict[str, int]  # questions per type
    correct: list[bool]  # per question
    consensus: float | None  # VQA v2 accuracy, when some question has several reference answers
    consensus_per_type: dict[str, float] | None

    @property
    def n(self) -> int:
        return len(self.correct)


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    question_types: Sequence[str | None] | None = None,
) -> VQAScores:
    """Exact-match accuracy after normalisation, overall and per question type.

    Args:
        predictions: one answer per question.
        answers: per question, the true answer or a list of reference answers (VQA v2 gives ten). With a
            list, exact match compares with the most common one (the first of the most common on a tie),
            and the consensus accuracy uses them all.
        question_types: per question, its type (``colour``, ``count``...); None groups as ``"other"``.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"one prediction per question is needed; got {len(predictions)} for {len(answers)}")
    types = [t or "other" for t in (question_types or ["all"] * len(answers))]
    if len(types) != len(answers):
        raise ValueError(f"one question type per question is needed; got {len(types)} for {len(answers)}")
    correct, consensus = [], []
    several = False
    for pred, ans in zip(predictions, answers):
        refs = [normalize_answer(a) for a in ([ans] if isinstance(ans, str) else ans)]
        if not refs:
            raise ValueError("every question needs at least one reference answer")
        several |= len(refs) > 1
        p = normalize_answer(pred)
        correct.append(p == Counter(refs).most_common(1)[0][0])
        consensus.append(consensus_score(p, refs))
    by_type: dict[str, list[int]] = defaultdict(list)
    for k, t in enumerate(types):
        by_type[t].append(k)
    order = sorted(by_type)

    def mean(values: Sequence[float], idx: Sequence[int] | None = None) -> float:
        picked = [values[k] for k in idx] if idx is not None else list(values)
        return sum(picked) / len(picked) if picked else float("nan")

    return VQAScores(
        mean(correct),
        {t: mean(correct, by_type[t]) for t in order},
        {t: len(by_type[t]) for t in order},
        correct,
        mean(consensus) if several else None,
        {t: mean(consensus, by_type[t]) for t in order} if several else None,
    )


# ---------------------------------------------------------------------------------------------------
# Evaluation end to end


@dataclass
class QASet:
    images: list[Image.Image | Path]  # per question: in memory (ShapesWorld), or its file
    questions: list[str]
    answers: list[str]
    types: list[str | None]
    names: list[str]  # per question, its image
    source: str


def qa_set(data: str, n: int, split: str = "test", shapes: ShapesConfig | None = None) -> QASet:
    """The first ``n`` questions of a ShapesWorld split (every question of a scene, scene by scene) or a qa.jsonl."""
    from ..data.datasets import DataFormatError, read_qa
    from ..data.shapes import ShapesWorld
    from .report import split_folder

    ds = QASet([], [], [], [], [], "")
    if data == "shapes":
        world = ShapesWorld(shapes)
        i = 0
        while len(ds.questions) < n:
            s = world.sample(split, i)
            for qa in s.questions[: n - len(ds.questions)]:
                _add(ds, s.image, qa.question, qa.answer, qa.type, f"{split}/{i}")
            i += 1
        ds.source = f"ShapesWorld {split} split, {i} scenes"
        return ds
    root = split_folder(data, split, "qa.jsonl")
    records = read_qa(root / "qa.jsonl")
    records = records[:n] if n else records
    ok = readable_images(root, [r.image for r in records])
    for r in records:
        if r.image in ok:
            _add(ds, root / r.image, r.question, r.answer, r.type, r.image)
    if not ds.questions:
        raise DataFormatError(f"{root}: none of the images of its {len(records)} questions could be read")
    ds.source = f"{root} ({len(ds.questions)} questions)"
    return ds


def _add(ds: QASet, image: Image.Image | Path, question: str, answer: str, qtype: str | None, name: str) -> None:
    ds.images.append(image)
    ds.questions.append(question)
    ds.answers.append(answer)
    ds.types.append(qtype)
    ds.names.append(name)


def evaluate_answerer(
    answerer: Any,
    data: str = "shapes",
    n: int = 1000,
    out: str | Path | None = None,
    split: str = "test",
    options: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    samples: int = 12,
) -> dict[str, Any]:
    """Accuracy of an answerer on ``n`` questions, overall and per question type.

    Args:
        answerer: anything with ``answer(images, questions, **options) -> list[str]`` (an :class:`Answerer`).
        data: ``"shapes"`` or a folder with ``qa.jsonl`` (``{"image", "question", "answer", "type"}`` lines).
        n: questions to ask (0: all of a folder).
        out: when given, ``vqa.json``, ``vqa_types.png`` and ``vqa_samples.png`` go there.
        options: generation options passed to every ``answer`` call.
        samples: questions on the sample sheet (wrong answers first, then right ones).
    """
    task = GenerationTask("vqa", "answer", qa_set, lambda ds: (ds.questions,), lambda ds, p: _score(ds, p, samples))
    return evaluate_generation(task, answerer, data, n, out, split, options, batch_size)


def _score(ds: QASet, preds: list[str], samples: int) -> Scored:
    """Accuracy overall and per type of the answers to ``ds``, and the plots to draw of them."""
    scores = vqa_accuracy(preds, ds.answers, ds.types)
    metrics: dict[str, Any] = {"accuracy": scores.accuracy, "per_type": scores.per_type}
    if scores.consensus is not None:
        metrics.update(consensus=scores.consensus, consensus_per_type=scores.consensus_per_type)
    per_question = [
        {
            "image": ds.names[k],
            "question": ds.questions[k],
            "answer": ds.answers[k],
            "predicted": preds[k],
            "type": ds.types[k],
            "correct": scores.correct[k],
        }
        for k in range(scores.n)
    ]

    def plots(out: Path, report: dict[str, Any]) -> dict[str, Path]:
        return {
            "types": plot_type_accuracy(scores, out / "vqa_types.png", title=_title(report)),
            "samples": _samples(ds, preds, scores, samples, out / "vqa_samples.png", report["model"]),
        }

    details = {"questions_per_type": scores.counts, "scoring": "exact match after VQA answer normalisation"}
    return Scored(metrics, details, "per_question", per_question, plots)


def _title(report: dict[str, Any]) -> str:
    return f"{report['model']} on {report['data']}: accuracy {report['metrics']['accuracy']:.3f} (n={report['n']})"


def _samples(ds: QASet, preds: list[str], scores: VQAScores, k: int, path: Path, model: str) -> Path:
    """A sheet of about half wrong and half right answers, one question per image while images last."""
    n_bad = scores.correct.count(False)
    quota = {False: min(n_bad, max(k // 2, k - (scores.n - n_bad)))}
    quota[True] = k - quota[False]
    by_image: dict[str, dict[bool, int]] = {}  # image -> its first wrong and first right question
    for i, ok in enumerate(scores.correct):
        by_image.setdefault(ds.names[i], {}).setdefault(ok, i)
    picked: list[int] = []
    for first in by_image.values():  # one question per image while images last
        ok = False if False in first and quota[False] else True if True in first and quota[True] else None
        if ok is not None:
            picked.append(first[ok])
            quota[ok] -= 1
    for i, ok in enumerate(scores.correct):  # few images: more questions of the same ones
        if quota[ok] and i not in picked:
            picked.append(i)
            quota[ok] -= 1
    picked.sort()
    lines = [
        [
            (f"Q: {ds.questions[i]}", "#222222"),
            (
                f"predicted: {preds[i]}" + (" ✓" if scores.correct[i] else " ✗"),
                "#1e7b34" if scores.correct[i] else "#b03a2e",
            ),
            (f"true: {ds.answers[i]}" + (f"  [{ds.types[i]}]" if ds.types[i] else ""), "#555555"),
        ]
        for i in picked
    ]
    title = f"{model}: answers ({scores.correct.count(False)} of {scores.n} wrong; wrong ones in red)"
    return sample_sheet(open_images([ds.images[i] for i in picked]), lines, path, title=title)


def plot_type_accuracy(scores: VQAScores, path: str | Path, title: str = "") -> Path:
    """Bars of accuracy per question type, with the number of questions of each, and the overall line."""
    from .plots import _save, plt

    types = list(scores.per_type)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(types) + 2), 3.8))
    values = [scores.per_type[t] for t in types]
    bars = ax.bar(range(len(types)), values, color="#2e86c1")
    ax.bar_label(bars, labels=[f"{v:.2f}\nn={scores.counts[t]}" for v, t in zip(values, types)], fontsize=8)
    ax.axhline(scores.accuracy, color="#c0392b", lw=1.2, ls="--", label=f"overall {scores.accuracy:.3f}")
    ax.set_xticks(range(len(types)), types)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines for the terminal."""
    m = report["metrics"]
    lines = [f"vqa of {report['model']} on {report['data']}", f"  accuracy {m['accuracy']:.3f}  (n={report['n']})"]
    lines.append(
        "  " + "  ".join(f"{t} {v:.3f} (n={report['questions_per_type'][t]})" for t, v in m["per_type"].items())
    )
    lines += [f"  plot: {p}" for p in report.get("plots", {}).values()]
    return lines


__all__ = ["normalize_answer", "consensus_score", "vqa_accuracy", "evaluate_answerer", "summary_lines"]
