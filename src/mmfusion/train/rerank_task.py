"""Training adapter for the cross-attention re-ranker: each image against false captions, each caption against
other images, softmax over the candidates.

The candidates are the hard ones a CLIP confuses (:mod:`mmfusion.data.negatives`, as the composition benchmark
makes them): per image, its caption against ``rerank.hard_negatives`` edits of its captions that are false of it
(attributes or a relation swapped, one replaced, a count changed; word swaps for a caption folder) and
``rerank.random_captions`` captions of other images in the batch; per caption, its image against
``rerank.changed_scenes`` minimally changed scenes of which it is false (ShapesWorld) and ``rerank.random_images``
other images. A candidate that is in fact true (another image's caption that also describes this scene) is left
out of the softmax, not counted as a negative. The CLIP's towers come from ``init.from_clip`` and stay frozen
unless ``model.freeze_clip=false``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import normalize_batch
from ..data.negatives import NEGATIVE_TYPES, changed_scenes, hard_negative
from ..data.pairs import Pair, PairSampler, ShapesPairs
from ..data.scene import Scene
from ..data.shapes import Caption, satisfies
from ..data.tokenizer import Tokenizer
from ..models.reranker import Reranker
from .clip_task import build_pair_source, first_epoch_in_order, start_from, trained_on
from .config import RunConfig
from .text import run_tokenizer
from .trainer import TaskDefaults

log = logging.getLogger(__name__)


@dataclass
class RerankBatch:
    images: torch.Tensor  # (NI, 3, S, S) normalised: the batch's images, then changed scenes
    tokens: torch.Tensor  # (NT, L): the batch's captions, then the hard negative captions
    i2t: torch.Tensor  # (B, C) per image, text candidates: column 0 its caption; -1 where none
    t2i: torch.Tensor  # (B, C') per caption, image candidates: column 0 its image; -1 where none
    meanings: list[dict | None] = field(default_factory=list)  # per text, when known (what the tests check)
    scenes: list[Scene | None] = field(default_factory=list)  # per image, when known
    # (P, 3) image, the caption a negative was made from, the negative: for scores that compare texts only of one
    # length and wording (a captioner's likelihood); made when the task asks (``RerankTask.pairwise``)
    i2t_pairs: torch.Tensor | None = None


def _true_of(pair: Pair, text: str, meaning: dict | None) -> bool:
    """Whether a caption is true of a pair's image: by the scene when both are known, else by equal text."""
    if pair.scene is not None and meaning is not None:
        return satisfies(pair.scene, meaning)
    return text.strip().lower() in {c.strip().lower() for c in pair.captions}


def _others(rng: np.random.Generator, n: int, i: int, k: int) -> list[int]:
    """Up to ``k`` distinct indices of ``range(n)`` other than ``i``."""
    pool = [j for j in range(n) if j != i]
    return [pool[j] for j in rng.permutation(len(pool))[:k]]


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def candidate_sampler(cfg: RunConfig, image_size: int) -> PairSampler:
    """The pairs a re-ranker run reads: ShapesWorld's negatives are drawn by the task from all of a scene's captions
    (:meth:`RerankTask._scene_negatives`), a caption folder's by the sampler as word swaps."""
    source = build_pair_source(cfg, image_size)
    folder_negatives = 0 if isinstance(source, ShapesPairs) else cfg.rerank.hard_negatives
    return PairSampler(source, cfg.train.seed, cfg.data.augment, first_epoch_in_order(cfg, source),
                       hard_negatives=folder_negatives)  # fmt: skip


class RerankTask(TaskDefaults):
    """Batches, loss and checkpoints of a re-ranker run (see :class:`mmfusion.train.trainer.Trainer`)."""

    name = "rerank"
    pairwise = False  # also each negative beside the caption it was made from (RerankBatch.i2t_pairs)

    def __init__(self, cfg: RunConfig, model: Reranker, sampler: PairSampler, device: torch.device):
        self.cfg, self.model, self.sampler, self.device = cfg, model, sampler, device
        unknown = sorted(set(cfg.rerank.kinds) - set(NEGATIVE_TYPES))
        if unknown:
            raise ValueError(f"rerank.kinds: unknown {', '.join(unknown)}; choose among {', '.join(NEGATIVE_TYPES)}")
        self.kinds = tuple(cfg.rerank.kinds) or tuple(NEGATIVE_TYPES)
        self.random_captions = cfg.rerank.random_captions  # per image, other images' captions among its candidates

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> RerankTask:
        if not cfg.init.from_clip:
            raise ValueError("a re-ranker reads a trained CLIP's features: give --init.from_clip=RUN (a CLIP run)")
        clip = start_from(cfg.init.from_clip, device)
        model = Reranker.from_clip(clip, cfg.model_config("reranker"), name=cfg.preset).to(device)
        model.meta = {"trained_on": trained_on(cfg), "from_clip": str(cfg.init.from_clip)}
        sampler = candidate_sampler(cfg, model.cfg.clip.vision.image_size)
        log.info("re-ranker over %s: %s trainable parameters", cfg.init.from_clip,
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")  # fmt: skip
        return cls(cfg, model, sampler, device)

    def dataset_size(self) -> int:
        return len(self.sampler.source)

    def positions(self, step: int) -> tuple[int, int]:
        """As every task's, but on the ShapesWorld stream past its curriculum: a re-ranker learns on top of trained
        models, from crowded scenes (the stream's first scenes hold one object: no swap, relation or count to
        learn), as VQA reads it."""
        start, count = super().positions(step)
        source = self.sampler.source
        return start + (2 * source.world.cfg.curriculum if isinstance(source, ShapesPairs) else 0), count

    def prepare(self, step: int) -> RerankBatch:
        """The batch of optimiser step ``step``: a pure function of the step (CPU work)."""
        pairs = self.sampler.batch(*self.positions(step))
        rng = np.random.default_rng([self.cfg.train.seed, 29, step])
        for p in pairs:
            self._scene_negatives(p, rng)
        rc, B = self.cfg.rerank, len(pairs)
        texts = [p.captions[0] for p in pairs]
        meanings = [(p.meanings or [None])[0] for p in pairs]
        i2t, i2t_pairs = [], []
        for i, p in enumerate(pairs):
            row = [i]
            seen, made_from = {texts[i]}, {texts[i]: i}
            for text, meaning, made in zip(p.negatives, p.negative_meanings, p.negative_sources, strict=True):
                if text in seen or _true_of(p, text, meaning):  # a slot no edit filled holds a true one
                    continue
                seen.add(text)
                row.append(len(texts))
                texts.append(text)
                meanings.append(meaning)
                if self.pairwise:
                    if made.text not in made_from:
                        made_from[made.text] = len(texts)
                        texts.append(made.text)
                        meanings.append(made.meaning)
                    i2t_pairs.append([i, made_from[made.text], row[-1]])
            row += [j for j in _others(rng, B, i, self.random_captions) if not _true_of(p, texts[j], meanings[j])]
            i2t.append(row)
        images, scenes = [p.image for p in pairs], [p.scene for p in pairs]
        t2i = []
        for i, p in enumerate(pairs):
            row = [i]
            for scene in self._changed(p, meanings[i], rng):
                row.append(len(images))
                images.append(np.asarray(self.sampler.source.world.render(scene, p.image.shape[0]), dtype=np.uint8))
                scenes.append(scene)
            row += [j for j in _others(rng, B, i, rc.random_images) if not _true_of(pairs[j], texts[i], meanings[i])]
            t2i.append(row)
        t = self.model.transform
        pixels = normalize_batch(torch.from_numpy(np.stack(images)), t.mean, t.std)
        pairwise = torch.tensor(i2t_pairs, dtype=torch.long).view(-1, 3) if self.pairwise else None
        return RerankBatch(pixels, self.model.tokenizer.encode(texts), _padded(i2t), _padded(t2i), meanings, scenes,
                           pairwise)  # fmt: skip

    def _scene_negatives(self, pair: Pair, rng: np.random.Generator) -> None:
        """ShapesWorld: ``rerank.hard_negatives`` negatives drawn from all the scene's captions, a type first and
        then an edit of that type (as the benchmark draws them; one random caption rarely has a swap to make), the
        pair's caption becoming the one the first negative was made from (the closest comparison)."""
        source = self.sampler.source
        if not isinstance(source, ShapesPairs) or pair.scene is None:
            return
        captions = source.world.captions(pair.scene)
        got = [
            hard_negative(pair.scene, captions, rng, self.kinds, avoid=source.heldout)
            for _ in range(self.cfg.rerank.hard_negatives)
        ]
        got = [g for g in got if g is not None]
        if got:
            pair.captions, pair.meanings = [got[0][0].text], [got[0][0].meaning]
        pair.negatives = [n.text for _, n in got]
        pair.negative_meanings = [n.meaning for _, n in got]
        pair.negative_sources = [c for c, _ in got]

    def _changed(self, pair: Pair, meaning: dict | None, rng: np.random.Generator) -> list:
        """Up to ``rerank.changed_scenes`` scenes minimally changed so that the pair's caption is false of them, each
        of a type drawn first (replacements, many per caption, would otherwise crowd out the swaps)."""
        k = self.cfg.rerank.changed_scenes
        if not k or meaning is None or pair.scene is None or not isinstance(self.sampler.source, ShapesPairs):
            return []
        avoid = self.sampler.source.heldout
        by_kind: dict[str, list] = {}
        distinct = tuple(dict.fromkeys(self.kinds))
        for ch in changed_scenes(pair.scene, Caption(pair.captions[0], meaning), rng, distinct, avoid=avoid):
            by_kind.setdefault(ch.kind, []).append(ch.scene)
        out = []
        for _ in range(min(k, sum(len(v) for v in by_kind.values()))):
            drawn = [kk for kk in self.kinds if by_kind.get(kk)]  # as hard_negative draws: listed twice, twice as often
            options = by_kind[drawn[int(rng.integers(len(drawn)))]]
            out.append(options.pop(int(rng.integers(len(options)))))
        return out

    def train_step(self, batch: RerankBatch, accum: int,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:  # fmt: skip
        with autocast():
            memory = self.model.encode_images(batch.images.to(self.device))
            feats = self.model.encode_texts(batch.tokens.to(self.device))
            i2t = candidate_loss(self.model, memory, feats, batch.i2t.to(self.device), texts_vary=True)
            t2i = candidate_loss(self.model, memory, feats, batch.t2i.to(self.device), texts_vary=False)
            loss = i2t.loss + self.cfg.rerank.text_weight * t2i.loss
        loss.backward()
        return {"loss": float(loss.detach()), "i2t_acc": i2t.accuracy, "t2i_acc": t2i.accuracy}

    def evaluate(self, out: Path) -> dict:
        """The composition benchmark on held-out ShapesWorld scenes: the re-ranker, and its CLIP alone."""
        from ..eval.rerank import compare_composition

        if self.cfg.data.source != "shapes" or not self.cfg.rerank.eval_scenes:
            return {}
        return compare_composition(self.model, n=self.cfg.rerank.eval_scenes, out=out, progress=False)

    @staticmethod
    def summarize(report: dict, out: Path) -> list[str]:
        from ..eval.rerank import comparison_lines

        return comparison_lines(report) if report else []


class CaptionRerankTask(RerankTask):
    """A captioner trained as a re-ranker (``train rerank --preset caption-tiny``): its log-likelihood of a caption
    given an image (:class:`~mmfusion.models.caption_ranker.CaptionRanker`) is the score ranked over the same
    candidates as the cross-attention re-ranker's, beside its captioning loss on the true pairs
    (``rerank.caption_weight``), so the run stays a captioner that captions, answers if it did, and re-ranks.
    Per image, each hard negative is ranked against the caption it was made from (:func:`pair_loss`)."""

    pairwise = True  # a likelihood compares texts of one length: each negative against the caption it edits

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> CaptionRerankTask:
        from ..models.captioner import CaptionModel
        from ..models.checkpoint import load

        if cfg.init.from_captioner:
            model = load(cfg.init.from_captioner)
            if getattr(model, "family", None) != "captioner":
                raise ValueError(f"init.from_captioner: {cfg.init.from_captioner} is not a captioner checkpoint")
            if getattr(model, "precision", "").startswith("int8"):
                raise ValueError(f"init.from_captioner: {cfg.init.from_captioner} is kept as int8; fine-tune the "
                                 "fp32 checkpoint it came from")  # fmt: skip
            _add_memory_positions(model, cfg)
        elif cfg.init.from_clip:
            model = CaptionModel.from_clip(start_from(cfg.init.from_clip, device), cfg.model_config("captioner"),
                                           freeze=cfg.init.freeze_vision, name=cfg.preset)  # fmt: skip
            # the CLIP's tokenizer, at the decoder's context length (a longer caption is cut, not an error)
            model.tokenizer = run_tokenizer(model.tokenizer, list, model.cfg.decoder, "model.decoder")
        else:
            raise ValueError(
                "a captioner re-ranker starts from a trained captioner (--init.from_captioner=RUN, best: it already "
                "binds colours to shapes) or a CLIP's image encoder (--init.from_clip=RUN)"
            )
        model = model.to(device)
        model.meta = {"trained_on": {**trained_on(cfg), "from_captioner": cfg.init.from_captioner,
                                     "from_clip": cfg.init.from_clip, "task": "rerank"}}  # fmt: skip
        task = cls(cfg, model, candidate_sampler(cfg, model.cfg.vision.image_size), device)
        if task.random_captions:  # a short caption of another image is likelier than a long true one
            log.info("a captioner ranks no random captions (their likelihoods compare lengths, not meanings): "
                     "rerank.random_captions %d is not used", task.random_captions)  # fmt: skip
            task.random_captions = 0
        return task

    def train_step(self, batch: RerankBatch, accum: int,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:  # fmt: skip
        from ..data.tokenizer import PAD_ID
        from ..models.caption_ranker import CaptionRanker

        ranker = CaptionRanker(self.model)
        with autocast():
            memory = ranker.encode_images(batch.images.to(self.device))
            feats = ranker.encode_texts(batch.tokens.to(self.device))
            i2t = pair_loss(ranker, memory, feats, batch.i2t_pairs.to(self.device))
            t2i = candidate_loss(ranker, memory, feats, batch.t2i.to(self.device), texts_vary=False)
            own = torch.arange(len(batch.i2t), device=self.device)  # image i with its caption i: captioning, <eot> too
            words = ((feats.tokens[own] != PAD_ID).sum() - len(own)).clamp_min(1)  # the tokens after <sot>
            caption = -self.model.sequence_logprob(memory.tokens, feats.tokens[own], own).sum() / words
            loss = i2t.loss + self.cfg.rerank.text_weight * t2i.loss + self.cfg.rerank.caption_weight * caption
        loss.backward()
        return {"loss": float(loss.detach()), "caption_loss": float(caption.detach()), "i2t_acc": i2t.accuracy,
                "t2i_acc": t2i.accuracy}  # fmt: skip

    def evaluate(self, out: Path) -> dict:
        """The composition benchmark on held-out ShapesWorld scenes, scored by the captioner's likelihood."""
        from ..eval.rerank import compare_composition
        from ..models.caption_ranker import CaptionRanker

        if self.cfg.data.source != "shapes" or not self.cfg.rerank.eval_scenes:
            return {}
        return compare_composition(CaptionRanker(self.model), n=self.cfg.rerank.eval_scenes, out=out, progress=False)


def _add_memory_positions(model, cfg: RunConfig) -> None:
    """A captioner loaded whole keeps its architecture; the one change it takes is ``model.decoder.
    memory_positions=true`` (zero-initialised: the fine-tune starts from the captioner as it was)."""
    overrides = copy.deepcopy(cfg.model)
    decoder = overrides.get("decoder")
    wanted = decoder.pop("memory_positions", None) if isinstance(decoder, dict) else None
    if wanted is True:
        model.decoder.add_memory_positions()
        log.info("init.from_captioner: the decoder's cross-attention now reads the image tokens' positions")
    elif wanted is not None and (wanted is not False or model.decoder.memory_pos is not None):
        decoder["memory_positions"] = wanted  # a value it cannot take (true or false; a learned map stays)
    if decoder == {}:
        del overrides["decoder"]
    if overrides or cfg.init.freeze_vision:
        log.warning("init.from_captioner: the captioner keeps its own architecture and trains whole; model overrides "
                    "other than decoder.memory_positions and init.freeze_vision are not applied")  # fmt: skip


@dataclass
class CandidateLoss:
    loss: torch.Tensor  # scalar: mean cross-entropy of the true candidate (column 0) over the rows
    accuracy: float  # rows whose true candidate scores highest


def pair_loss(model, memory, feats, pairs: torch.Tensor) -> CandidateLoss:
    """Each negative against the caption it was made from, on the same image: a two-way softmax per pair (``pairs``
    (P, 3): image, true text, negative text). Texts that differ only where the edit was compare fairly under a
    likelihood; a negative made from a shorter caption would otherwise win by its length."""
    if not len(pairs):  # no negative in the batch (a folder without word swaps): nothing to rank
        return CandidateLoss(memory.tokens.sum() * 0.0, 0.0)
    img, true, false = pairs.unbind(1)
    margin = (model.score_pairs(memory, feats, img, true) - model.score_pairs(memory, feats, img, false)).float()
    return CandidateLoss(F.softplus(-margin).mean(), float((margin > 0).float().mean()))


def candidate_loss(model, memory, feats, candidates: torch.Tensor, texts_vary: bool) -> CandidateLoss:
    """Softmax over each row's candidates (-1: none), the true one in column 0.

    Row ``i`` pairs image ``i`` with text candidates (``texts_vary``), or text ``i`` with image candidates."""
    R, C = candidates.shape
    valid = candidates >= 0  # (R, C)
    rows = torch.arange(R, device=candidates.device)[:, None].expand(R, C)[valid]  # (P,)
    cols = candidates[valid]  # (P,)
    img, txt = (rows, cols) if texts_vary else (cols, rows)
    logits = torch.full((R, C), float("-inf"), device=candidates.device)
    logits[valid] = model.score_pairs(memory, feats, img, txt).float()
    target = torch.zeros(R, dtype=torch.long, device=candidates.device)
    loss = F.cross_entropy(logits, target)
    return CandidateLoss(loss, float((logits.argmax(dim=1) == 0).float().mean()))
