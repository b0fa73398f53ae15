"""Training adapter for the VQA classifier: (image, question) -> answer, cross-entropy over the answer vocabulary.

Data: the ShapesWorld stream (example ``i`` of step ``s`` is training scene ``s * batch + i`` with one of its
questions, drawn by a seeded generator, so a resumed run sees the same batches), or a folder with ``qa.jsonl``
(``{"image", "question", "answer"}``) beside its images. The answer vocabulary is every answer of the training
data (ShapesWorld: of scenes past the curriculum, which cover every colour, shape, count, relation and yes/no).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import DataFormatError, read_qa
from ..data.images import ImageDecodeError, load_image, normalize_batch, to_uint8
from ..data.shapes import ShapesWorld
from ..data.tokenizer import Tokenizer
from ..models.registry import build_model, model_config
from ..models.vqa import VQAModel
from .config import RunConfig
from .trainer import TaskDefaults

log = logging.getLogger(__name__)
VOCAB_SCENES = 3000  # ShapesWorld scenes whose questions give the answer vocabulary and tokenizer text


class ShapesQuestions:
    """The ShapesWorld stream of one split as (image, question, answer, type) examples."""

    def __init__(self, world: ShapesWorld, image_size: int, split: str = "train"):
        self.world, self.image_size, self.split = world, image_size, split

    def __len__(self) -> int:
        return 0  # endless

    def example(self, index: int, rng: np.random.Generator):
        scene = self.world.scene(self.split, index)
        qas = self.world.questions(scene)
        qa = qas[int(rng.integers(len(qas)))]
        image = np.asarray(self.world.render(scene, self.image_size), dtype=np.uint8)
        return image, qa.question, qa.answer

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
        skipped = []
        for r in records:
            if r.image not in cache:
                try:
                    cache[r.image] = to_uint8(load_image(root / r.image), image_size)
                except (ImageDecodeError, OSError) as e:
                    cache[r.image] = None
                    skipped.append(f"{r.image} ({e})")
        if skipped:
            log.warning("skipped %d unreadable images: %s", len(skipped), ", ".join(skipped[:10]))
        self.records = [r for r in records if cache[r.image] is not None]
        if not self.records:
            raise DataFormatError(f"{path}: no question has a readable image")
        self.images = cache

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int, rng: np.random.Generator):
        r = self.records[index % len(self.records)]
        return self.images[r.image], r.question, r.answer

    def texts_and_answers(self, scenes: int) -> tuple[list[str], list[str]]:
        return [r.question for r in self.records], sorted({r.answer for r in self.records})


class VQATask(TaskDefaults):
    """Batches, loss and checkpoints of a VQA run (see :class:`mmfusion.train.trainer.Trainer`)."""

    name = "vqa"

    def __init__(self, cfg: RunConfig, model: VQAModel, source, device: torch.device):
        self.cfg, self.model, self.source, self.device = cfg, model, source, device

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> VQATask:
        family, mcfg = model_config(cfg.preset, cfg.model)
        if family != "vqa":
            raise ValueError(f"preset {cfg.preset!r} is a {family} model; `train vqa` needs a vqa preset")
        size = mcfg.vision.image_size
        clip = None
        if cfg.init.from_clip:
            from ..models.registry import load

            clip = load(cfg.init.from_clip)
            if getattr(clip, "family", None) != "clip":
                raise ValueError(f"init.from_clip: {cfg.init.from_clip} is not a CLIP checkpoint")
            mcfg.vision, mcfg.vision_embed_dim, size = clip.cfg.vision, clip.cfg.embed_dim, clip.cfg.vision.image_size
            mcfg.image_mean, mcfg.image_std = clip.cfg.image_mean, clip.cfg.image_std
            tokenizer = tokenizer or clip.tokenizer
        if cfg.data.source == "shapes":
            source = ShapesQuestions(ShapesWorld(cfg.data.shapes), size)
        else:
            source = FolderQuestions(Path(cfg.data.source), size)
        texts, answers = source.texts_and_answers(min(cfg.data.tokenizer_captions, VOCAB_SCENES))
        if not mcfg.answers:
            mcfg.answers = answers
        if tokenizer is None:
            tokenizer = Tokenizer.train(texts, mcfg.question.vocab_size, mcfg.question.context_length)
        tokenizer.context_length = mcfg.question.context_length
        if tokenizer.vocab_size > mcfg.question.vocab_size:
            mcfg.question.vocab_size = tokenizer.vocab_size
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
        if len(self.source):  # a folder: a fresh permutation per epoch, a pure function of the step
            n = len(self.source)
            epoch, pos = divmod(step * B, n)
            order = np.concatenate([np.random.default_rng([self.cfg.train.seed, e]).permutation(n)
                                    for e in (epoch, epoch + 1)])  # fmt: skip
            indices = order[pos : pos + B]
        else:
            indices = range(step * B, step * B + B)
        examples = [self.source.example(int(i), rng) for i in indices]
        images = torch.from_numpy(np.stack([e[0] for e in examples]))
        tokens = self.model.tokenizer.encode([e[1] for e in examples])
        index = {a: i for i, a in enumerate(self.model.cfg.answers)}
        answers = torch.tensor([index.get(e[2], -100) for e in examples], dtype=torch.long)  # unknown: ignored
        return normalize_batch(images, self.model.cfg.image_mean, self.model.cfg.image_std), tokens, answers

    def train_step(self, batch, accum: int, autocast: Callable[[], contextlib.AbstractContextManager]):
        images, tokens, answers = (t.to(self.device) for t in batch)
        n = len(images)
        total = {"loss": 0.0, "acc": 0.0}
        for part in torch.arange(n).chunk(max(1, min(accum, n))):
            with autocast():
                logits = self.model(images[part], tokens[part])
            loss = torch.nn.functional.cross_entropy(logits.float(), answers[part], ignore_index=-100)
            (loss * len(part) / n).backward()
            total["loss"] += float(loss.detach()) * len(part) / n
            total["acc"] += float((logits.argmax(-1) == answers[part]).float().sum()) / n
        return total
