"""Training adapter for the VQA classifier: (image, question) -> answer, cross-entropy over the answer vocabulary.

Data: the ShapesWorld stream (example ``i`` of step ``s`` is training scene ``s * batch + i`` with
``vqa.questions_per_image`` of its questions, drawn by a seeded generator, so a resumed run sees the same
batches), or a folder with ``qa.jsonl`` (``{"image", "question", "answer"}``) beside its images, an epoch
being every image with up to that many of its questions. Each image is encoded once for all its questions.
The answer vocabulary is every answer of the training data (ShapesWorld: of scenes past the curriculum, which
cover every colour, shape, count, relation and yes/no).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import DataFormatError, DecodeReport, read_qa
from ..data.images import ImageDecodeError, load_image, normalize_batch, to_uint8
from ..data.shapes import ShapesWorld
from ..data.tokenizer import EOT_ID, PAD_ID, SOT_ID, Tokenizer
from ..models.checkpoint import load
from ..models.registry import build_model
from ..models.vqa import VQAModel
from .config import RunConfig
from .text import run_tokenizer
from .trainer import TaskDefaults, batch_indices

log = logging.getLogger(__name__)
VOCAB_SCENES = 3000  # ShapesWorld scenes whose questions give the answer vocabulary and tokenizer text


class ShapesQuestions:
    """The ShapesWorld stream of one split as (image, question, answer, type) examples."""

    def __init__(self, world: ShapesWorld, image_size: int, split: str = "train"):
        self.world, self.image_size, self.split = world, image_size, split

    def __len__(self) -> int:
        return 0  # endless

    def example(self, index: int, rng: np.random.Generator, k: int = 1):
        """(image, up to ``k`` different (question, answer) pairs about it)."""
        scene = self.world.scene(self.split, index)
        qas = self.world.questions(scene)
        picked = rng.choice(len(qas), size=min(k, len(qas)), replace=False)
        image = np.asarray(self.world.render(scene, self.image_size), dtype=np.uint8)
        return image, [(qas[int(i)].question, qas[int(i)].answer) for i in picked]

    def texts_and_answers(self, scenes: int) -> tuple[list[str], list[str]]:
        texts, answers = list(self.world.vocabulary_texts()), set()
        # scenes past the curriculum (the stream starts with single objects, which have no relation questions)
        start = 2 * self.world.cfg.curriculum if self.split == "train" else 0
        for i in range(start, start + scenes):
            scene = self.world.scene(self.split, i)
            for qa in self.world.questions(scene):
                texts.append(qa.question)
                answers.add(qa.answer)
            texts.extend(c.text for c in self.world.captions(scene))
        return texts, sorted(answers)


class FolderQuestions:
    """A folder with ``qa.jsonl`` and its images, decoded once (unreadable images are skipped and named)."""

    def __init__(self, root: Path, image_size: int):
        path = root / "qa.jsonl"
        if not path.is_file():
            raise DataFormatError(f"no qa.jsonl in {root}: point --data at a folder with images and qa.jsonl")
        records = read_qa(path)
        cache: dict[str, np.ndarray | None] = {}
        report = DecodeReport()
        for r in records:
            if r.image not in cache:
                try:
                    cache[r.image] = to_uint8(load_image(root / r.image), image_size)
                    report.decoded += 1
                except (ImageDecodeError, OSError) as e:
                    cache[r.image] = None
                    report.skipped.append((r.image, str(e)))
        report.log(str(path))
        self.records = [r for r in records if cache[r.image] is not None]
        if not self.records:
            raise DataFormatError(f"{path}: no question has a readable image")
        self.images = cache
        by_image: dict[str, list] = {}
        for r in self.records:
            by_image.setdefault(r.image, []).append(r)
        self.by_image = list(by_image.items())  # in file order

    def __len__(self) -> int:
        return len(self.by_image)  # an epoch: every image, with up to k of its questions

    def example(self, index: int, rng: np.random.Generator, k: int = 1):
        """(image, up to ``k`` different (question, answer) pairs about it)."""
        image, records = self.by_image[index % len(self.by_image)]
        picked = rng.choice(len(records), size=min(k, len(records)), replace=False)
        return self.images[image], [(records[int(i)].question, records[int(i)].answer) for i in picked]

    def texts_and_answers(self, scenes: int) -> tuple[list[str], list[str]]:
        return [r.question for r in self.records], sorted({r.answer for r in self.records})


def question_source(cfg: RunConfig, image_size: int) -> ShapesQuestions | FolderQuestions:
    """The questions of a run: the ShapesWorld stream, or a folder with qa.jsonl."""
    if cfg.data.source == "shapes":
        return ShapesQuestions(ShapesWorld(cfg.data.shapes), image_size)
    return FolderQuestions(Path(cfg.data.source), image_size)


class VQATask(TaskDefaults):
    """Batches, loss and checkpoints of a VQA run (see :class:`mmfusion.train.trainer.Trainer`)."""

    name = "vqa"

    def __init__(self, cfg: RunConfig, model: VQAModel, source, device: torch.device):
        self.cfg, self.model, self.source, self.device = cfg, model, source, device

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> VQATask:
        mcfg = cfg.model_config("vqa")
        size = mcfg.vision.image_size
        clip = None
        if cfg.init.from_clip:
            clip = load(cfg.init.from_clip)
            if getattr(clip, "family", None) != "clip":
                raise ValueError(f"init.from_clip: {cfg.init.from_clip} is not a CLIP checkpoint")
            mcfg.vision, mcfg.vision_embed_dim, size = clip.cfg.vision, clip.cfg.embed_dim, clip.cfg.vision.image_size
            mcfg.image_mean, mcfg.image_std = clip.cfg.image_mean, clip.cfg.image_std
            tokenizer = tokenizer or clip.tokenizer
        source = question_source(cfg, size)
        texts, answers = source.texts_and_answers(min(cfg.data.tokenizer_captions, VOCAB_SCENES))
        if not mcfg.answers:
            mcfg.answers = answers
        tokenizer = run_tokenizer(tokenizer, lambda: texts, mcfg.question, "model.question", grow=True)
        mcfg.freeze_vision = cfg.init.freeze_vision
        model = build_model("vqa", mcfg, tokenizer, name=cfg.preset)
        if clip is not None:
            model.visual.load_state_dict(clip.visual.state_dict())
        model = model.to(device)
        model.meta = {"trained_on": {"source": cfg.data.source, "from_clip": cfg.init.from_clip}}
        log.info("vqa: %d answers, %s trainable parameters", len(mcfg.answers),
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")  # fmt: skip
        return cls(cfg, model, source, device)

    def dataset_size(self) -> int:
        return len(self.source)

    def prepare(self, step: int):
        B = self.cfg.train.batch_size
        rng = np.random.default_rng([self.cfg.train.seed, step])
        indices = self.mine(batch_indices(self.cfg.train.seed, step, B, len(self.source)))
        examples = [self.source.example(int(i), rng, self.cfg.vqa.questions_per_image) for i in indices]
        images = torch.from_numpy(np.stack([e[0] for e in examples]))
        pairs = [(i, q, a) for i, e in enumerate(examples) for q, a in e[1]]
        image_index = torch.tensor([i for i, _, _ in pairs], dtype=torch.long)
        tokens = self.model.tokenizer.encode([q for _, q, _ in pairs])
        index = {a: i for i, a in enumerate(self.model.cfg.answers)}
        answers = torch.tensor([index.get(a, -100) for _, _, a in pairs], dtype=torch.long)  # unknown: ignored
        images = normalize_batch(images, self.model.cfg.image_mean, self.model.cfg.image_std)
        return images, tokens, image_index, answers

    def train_step(self, batch, accum: int, autocast: Callable[[], contextlib.AbstractContextManager]):
        images, tokens, image_index, answers = (t.to(self.device) for t in batch)
        n, q = len(images), len(answers)
        total = {"loss": 0.0, "acc": 0.0}
        for part in torch.arange(n).chunk(max(1, min(accum, n))):  # micro-batches of images, with their questions
            rows = torch.isin(image_index, part).nonzero().squeeze(1)
            with autocast():
                logits = self.model(images[part], tokens[rows], image_index[rows] - part[0])
            loss = torch.nn.functional.cross_entropy(logits.float(), answers[rows], ignore_index=-100)
            (loss * len(rows) / q).backward()
            total["loss"] += float(loss.detach()) * len(rows) / q
            total["acc"] += float((logits.argmax(-1) == answers[rows]).float().sum()) / q
        return total


class GenerativeVQATask(TaskDefaults):
    """VQA by generation through a captioner's decoder (``mmfusion train vqa --preset caption-tiny``).

    Each question becomes the sequence ``<sot> question answer <eot>``, with the loss on the answer only; at
    inference :meth:`CaptionModel.answer` feeds ``<sot> question`` and decodes the rest, so compositional answers
    ("red circle") are spelled out word by word rather than picked from a fixed list. ``vqa.caption_share`` mixes
    captions into every batch (images of their own, the loss on the whole caption): the dense signal that binds
    each object's colour to its shape, which the question-only loss learns slowly. The trained model captions and
    answers.
    """

    name = "vqa"

    def __init__(self, cfg: RunConfig, model, questions, captions, device: torch.device):
        self.cfg, self.model, self.source, self.captions, self.device = cfg, model, questions, captions, device

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> GenerativeVQATask:
        from ..data.pairs import PairSampler
        from ..models.captioner import CaptionModel
        from .clip_task import build_pair_source, first_epoch_in_order, trained_on

        mcfg = cfg.model_config("captioner")
        if cfg.init.from_captioner:  # caption pre-training, then questions: the captioner already binds attributes
            model = load(cfg.init.from_captioner)
            if getattr(model, "family", None) != "captioner":
                raise ValueError(f"init.from_captioner: {cfg.init.from_captioner} is not a captioner checkpoint")
            mcfg, tokenizer = model.cfg, model.tokenizer
            if cfg.init.freeze_vision:
                mcfg.freeze_vision = True
                model.visual.requires_grad_(False)
        elif cfg.init.from_clip:
            model = CaptionModel.from_clip(
                load(cfg.init.from_clip), mcfg, freeze=cfg.init.freeze_vision, name=cfg.preset
            )
            tokenizer = tokenizer or model.tokenizer
        else:
            mcfg.freeze_vision = cfg.init.freeze_vision
            model = None
        size = mcfg.vision.image_size
        questions = question_source(cfg, size)
        texts, answers = questions.texts_and_answers(min(cfg.data.tokenizer_captions, VOCAB_SCENES))
        tokenizer = run_tokenizer(tokenizer, lambda: texts + answers, mcfg.decoder, "model.decoder", grow=True)
        if model is None:
            model = build_model("captioner", mcfg, tokenizer, name=cfg.preset)
        model.cfg.answers_questions = True
        model.tokenizer = tokenizer
        captions = None
        if cfg.vqa.caption_share > 0:
            try:
                source = build_pair_source(cfg, size)
            except (DataFormatError, FileNotFoundError) as e:
                raise DataFormatError(f"{e}; vqa.caption_share mixes in captions: give a folder with captions.jsonl "
                                      "too, or set --vqa.caption_share=0") from e  # fmt: skip
            captions = PairSampler(source, cfg.train.seed, cfg.data.augment, first_epoch_in_order(cfg, source),
                                   captions_per_image=1, first_caption=True)  # fmt: skip
        model = model.to(device)
        model.meta = {"trained_on": {**trained_on(cfg), "from_clip": cfg.init.from_clip,
                                     "from_captioner": cfg.init.from_captioner, "task": "vqa"}}  # fmt: skip
        log.info("generative vqa (%s), captions %.0f%% of images: %s trainable parameters", cfg.preset,
                 100 * cfg.vqa.caption_share / (1 + cfg.vqa.caption_share),
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")  # fmt: skip
        return cls(cfg, model, questions, captions, device)

    def dataset_size(self) -> int:
        return len(self.source)

    def prepare(self, step: int):
        """Images (question images, then caption images), sequences (N, L), prompt lengths (N,) and the image of
        each sequence (N,)."""
        B, tok = self.cfg.train.batch_size, self.model.tokenizer
        rng = np.random.default_rng([self.cfg.train.seed, step])
        indices = self.mine(batch_indices(self.cfg.train.seed, step, B, len(self.source)))
        examples = [self.source.example(int(i), rng, self.cfg.vqa.questions_per_image) for i in indices]
        images = [e[0] for e in examples]
        seqs, prompts, owner = [], [], []
        for i, (_, qas) in enumerate(examples):
            for q, a in qas:
                prompt = self.model.prompt_ids(q)
                seqs.append([*prompt, *tok.ids(a), EOT_ID])
                prompts.append(len(prompt))
                owner.append(i)
        C = round(B * self.cfg.vqa.caption_share) if self.captions is not None else 0
        if C:
            for pair in self.captions.batch(step * C, C):
                owner.append(len(images))
                images.append(pair.image)
                seqs.append([SOT_ID, *tok.ids(pair.texts[0]), EOT_ID])
                prompts.append(1)
        L = self.model.cfg.decoder.context_length
        tokens = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
        for r, ids in enumerate(seqs):
            ids = ids[: L - 1] + [EOT_ID] if len(ids) > L else ids
            tokens[r, : len(ids)] = torch.tensor(ids)
        pixels = normalize_batch(torch.from_numpy(np.stack(images)), self.model.cfg.image_mean,
                                 self.model.cfg.image_std)  # fmt: skip
        return pixels, tokens, torch.tensor(prompts), torch.tensor(owner)

    def train_step(self, batch, accum: int, autocast: Callable[[], contextlib.AbstractContextManager]):
        from .caption_task import sequence_step

        images, tokens, prompts, owner = (t.to(self.device) for t in batch)
        return sequence_step(self.model, images, tokens, accum, autocast, prompts, owner)
