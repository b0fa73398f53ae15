"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4 and CIDEr-D.

BLEU (Papineni et al., 2002) and CIDEr-D (Vedantam et al., 2015) follow the COCO caption toolkit
(``pycocoevalcap``) line for line in what they count, so our numbers can be set beside published ones; the
tests check both scorers against values the toolkit computed on fixed corpora. The toolkit's scorers are
plain Python, but it tokenises with the Java PTB tokenizer; :func:`tokenize` is our Python stand-in for
that step.

Why our own code rather than the toolkit itself: ``pycocoevalcap`` is a ~100 MB install (the Java jars of
its PTB tokenizer, METEOR and SPICE) that also pulls in ``pycocotools``, it has had no release since 2020,
and its scorers print to stdout, take only lists of pre-tokenised strings and return per-image scores as
bare arrays. The two scorers here are ~150 lines, give per-image scores by id and the length ratio, and
agree with the toolkit to 1e-9 (``tests/eval/test_text_metrics.py``; the dev extra installs the toolkit to
check it live).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

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


__all__ = ["BleuScore", "CiderScore", "bleu", "cider", "tokenize"]
