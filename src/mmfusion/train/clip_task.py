"""Training adapter for CLIP-style dual encoders.

Gradient accumulation for a contrastive loss must keep every pair of the effective batch as a
negative for every other. Averaging per-micro-batch losses would not (each micro-batch would only
see its own negatives), so accumulation follows Gao et al., "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup" (GradCache, 2021): embed all micro-batches without a graph, compute
the loss over the whole batch and its gradient with respect to the embeddings, then re-run each
micro-batch with a graph and back-propagate those cached gradients. The result equals one big-batch
step, using the memory of one micro-batch. RNG state is replayed so stochastic layers see the same
draws in both passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import CaptionFolder, DataFormatError
from ..data.images import normalize_batch
from ..data.pairs import FolderPairs, Pair, PairSampler, PairSource, ShapesPairs, matches
from ..data.shapes import ShapesWorld
from ..data.tokenizer import Tokenizer
from ..models.clip import CLIP
from ..models.registry import build_model
from ..modules.global_losses import global_contrastive
from ..modules.losses import ContrastiveOutput, clip_loss, siglip_loss, triplet_loss
from ..utils.threads import usable_cpus
from .config import RunConfig
from .text import run_tokenizer
from .trainer import TaskDefaults

log = logging.getLogger(__name__)
INHERIT_BATCHES = 4  # training batches (of at most 64 pairs) the teacher's heads and channels are ranked on


@dataclass
class PairBatch:
    images: torch.Tensor  # (B, 3, S, S) normalised
    tokens: torch.Tensor  # (T, L) token ids: each image's k captions then its hard negatives
    positives: torch.Tensor | None  # (B, T) bool, or None when each image matches only its own caption
    meta: list[Pair] | None = None  # in several processes: this slice's pairs without images (for the mask)
    raw: np.ndarray | None = None  # with a teacher: the uint8 images (B, S, S, 3) it sees through its preprocessing
    texts: list[str] | None = None  # with a teacher: the texts of ``tokens``
    keys: list[int] | None = None  # with a teacher: dataset indices of the images (finite data), for its cache


def resolve_caption_folder(source: str) -> Path:
    """The folder holding captions.jsonl for a data source path (itself, or its train/ split)."""
    path = Path(source)
    for candidate in (path, path / "train"):
        if (candidate / "captions.jsonl").is_file():
            return candidate
    raise DataFormatError(
        f"no captions.jsonl in {path} or {path / 'train'}: point --data at a folder with "
        f"images/ and captions.jsonl, or use --data shapes"
    )


def build_pair_source(cfg: RunConfig, image_size: int) -> PairSource:
    if cfg.data.source == "shapes":
        return ShapesPairs(ShapesWorld(cfg.data.shapes), image_size)
    # decoded once, before training, while torch is idle: a thread per CPU this process may use (its cgroup quota,
    # not the host's cores), at most 8 as the decoder's default
    folder = CaptionFolder(resolve_caption_folder(cfg.data.source), image_size, cfg.data.max_pixels,
                           workers=min(8, usable_cpus()), progress=cfg.train.progress)  # fmt: skip
    log.info("training on %d images from %s (%d skipped)", len(folder), folder.root, len(folder.report.skipped))
    return FolderPairs(folder, image_size)


def first_epoch_in_order(cfg: RunConfig, source: PairSource) -> bool:
    """Whether a pair sampler reads its source's first epoch in order: ``data.order=file``, or ``auto`` on a
    ShapesWorld export with a curriculum (whose file order is the stream's)."""
    return cfg.data.order == "file" or (cfg.data.order == "auto" and getattr(source, "ordered_stream", False))


def trained_on(cfg: RunConfig) -> dict:
    """What a checkpoint records of its data, so evaluation can rebuild the same world and split."""
    if cfg.data.source == "shapes":
        return {"source": "shapes", "shapes": asdict(cfg.data.shapes)}
    return {"source": str(Path(cfg.data.source).resolve())}


def _clip(image, text, model: CLIP, positives, margin: float) -> ContrastiveOutput:
    return clip_loss(image, text, model.logit(), positives)


def _siglip(image, text, model: CLIP, positives, margin: float) -> ContrastiveOutput:
    if model.logit.bias is None:
        raise ValueError("the SigLIP loss needs a logit bias: set model.init_logit_bias (e.g. -10)")
    return siglip_loss(image, text, model.logit(), model.logit.bias, positives)


def _triplet(image, text, model: CLIP, positives, margin: float) -> ContrastiveOutput:
    return triplet_loss(image, text, margin, hardest=True, positives=positives)


# train.loss -> how it reads the model's learnable parts (a new loss is a pure function in modules/losses.py
# and one entry here)
CONTRASTIVE_LOSSES: dict[str, Callable[..., ContrastiveOutput]] = {
    "clip": _clip,
    "siglip": _siglip,
    "triplet": _triplet,
}


def contrastive_loss(
    kind: str, image: torch.Tensor, text: torch.Tensor, model: CLIP, positives: torch.Tensor | None, margin: float = 0.2
) -> ContrastiveOutput:
    if kind not in CONTRASTIVE_LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose {', '.join(CONTRASTIVE_LOSSES)}")
    return CONTRASTIVE_LOSSES[kind](image, text, model, positives, margin)


def _teacher(cfg: RunConfig, device: torch.device):
    """The run's :class:`~mmfusion.train.distill.Teacher`, after the checks that a set-up can use one."""
    if cfg.train.accum_steps > 1:
        raise ValueError("a teacher works on whole batches: set train.accum_steps=1 with distill.teacher")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # prepare() gives a slice no teacher inputs there
        raise ValueError("distillation runs in one process: drop --nproc (or torchrun) with distill.teacher")
    if cfg.distill.inherit and cfg.init.from_clip:
        raise ValueError("distill.inherit initialises the student from the teacher, init.from_clip from another "
                         "model: drop one of them")  # fmt: skip
    from .distill import Teacher

    with torch.random.fork_rng(devices=[]):  # building the teacher draws random weights: the student's init keeps its
        return Teacher(cfg.distill, device, cache_images=False)  # draws; whether images are cached: use_teacher


def start_from(path: str, device: torch.device) -> CLIP:
    """A trained CLIP to continue training: its weights, architecture and tokenizer (``init.from_clip``)."""
    from ..models import load

    model = load(path, device=device)
    if not isinstance(model, CLIP):
        raise ValueError(
            f"init.from_clip: {path} is a {getattr(model, 'family', type(model).__name__)} model, not a CLIP"
        )
    if getattr(model, "precision", "").startswith("int8"):
        raise ValueError(f"init.from_clip: {path} is kept as int8; train from the fp32 checkpoint it came from")
    return model.train()


class ClipTask(TaskDefaults):
    """Batches, loss and checkpoints of a CLIP run (see :class:`mmfusion.train.trainer.Trainer`).

    In several processes each embeds its slice of the global batch and back-propagates its share of the
    contrastive loss over the whole global batch (:mod:`mmfusion.modules.global_losses`): every pair of the
    global batch is a negative for every other, as in one process."""

    name = "clip"
    global_loss = True  # gradients of the processes' shares are summed

    def __init__(self, cfg: RunConfig, model: CLIP, sampler: PairSampler, device: torch.device):
        self.cfg, self.model, self.sampler, self.device = cfg, model, sampler, device
        self.teacher = None  # a distill.Teacher when the run has one
        self.distill_loss = None  # then a distill.DistillLoss: its terms, and the projection they may learn

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> ClipTask:
        if cfg.distill.inherit and not cfg.distill.teacher:
            raise ValueError("distill.inherit initialises the student from its teacher: name one with distill.teacher")
        teacher = _teacher(cfg, device) if cfg.distill.teacher else None
        if cfg.init.from_clip:  # the whole model, its architecture and tokenizer: fine-tuning, pruning's recovery
            model = start_from(cfg.init.from_clip, device)
            mcfg = model.cfg
            source = build_pair_source(cfg, mcfg.vision.image_size)
            model.meta = {"trained_on": trained_on(cfg), "init_from": str(cfg.init.from_clip),
                          **{k: v for k, v in model.meta.items() if k == "pruned"}}  # fmt: skip
        else:
            mcfg = cfg.model_config("clip")
            if cfg.train.loss == "siglip" and mcfg.init_logit_bias is None:
                # SigLIP's initialisation: t' = ln 10, b = -10, so early logits say "no match" to most pairs
                mcfg.init_logit_scale, mcfg.init_logit_bias = 2.302585092994046, -10.0
            source = build_pair_source(cfg, mcfg.vision.image_size)
            corpus = source.caption_corpus
            if cfg.distill.inherit and tokenizer is None:  # inherited token embeddings read the teacher's tokens
                from .inherit import teacher_tokenizer

                tokenizer = teacher_tokenizer(teacher.model)
            tokenizer = run_tokenizer(tokenizer, lambda: corpus(cfg.data.tokenizer_captions), mcfg.text, "model.text")
            model = build_model("clip", mcfg, tokenizer, name=cfg.preset).to(device)
            model.meta = {"trained_on": trained_on(cfg)}
        k = cfg.train.captions_per_image
        if k > 1 and cfg.train.loss == "triplet":
            raise ValueError("the triplet loss takes one caption per image: set train.captions_per_image=1")
        if cfg.train.hard_negatives and cfg.train.loss == "triplet":
            raise ValueError("the triplet loss has its own hardest negatives: set train.hard_negatives=0")
        sampler = PairSampler(
            source,
            cfg.train.seed,
            cfg.data.augment,
            first_epoch_in_order(cfg, source),
            captions_per_image=k,
            hard_negatives=cfg.train.hard_negatives,
            first_caption=cfg.data.caption_pick == "first",
        )
        task = cls(cfg, model, sampler, device)
        if teacher is not None:
            task.use_teacher(teacher, finite=len(source) > 0 and not cfg.data.augment.enabled)
        if cfg.init.whiten_patches and mcfg.vision.stem == "patch" and not cfg.init.from_clip:
            if cfg.distill.inherit:
                log.info("init.whiten_patches skipped: the patch embedding is inherited from the teacher")
            else:
                task.whiten_patches(cfg.init.whiten_patches)
        return task

    def use_teacher(self, teacher, finite: bool) -> None:
        """Learn from ``teacher`` (a :class:`~mmfusion.train.distill.Teacher`): its loss terms, with the projection
        they may learn, and with ``distill.inherit`` the student's initial weights. ``finite``: the data may cache
        the teacher's image embeddings."""
        from .distill import DistillLoss

        d = self.cfg.distill
        teacher.cache_images = d.cache and finite
        self.teacher, self.model.meta["distilled_from"] = teacher, str(d.teacher)
        self.distill_loss = DistillLoss(d, self.model.embed_dim, teacher.embed_dim).to(self.device)
        if self.distill_loss.project is not None:
            log.info("embedding regression through a learned %d -> %d projection", self.model.embed_dim,
                     teacher.embed_dim)  # fmt: skip
        if d.inherit:
            from .inherit import inherit
            from .prune import batches_of

            batches = None
            if d.inherit_by == "importance":
                batches = batches_of(teacher.model, self.sampler, INHERIT_BATCHES, min(64, self.cfg.train.batch_size))
            summary = inherit(self.model, teacher.model, batches)
            self.model.meta["inherited_from"] = {"teacher": str(d.teacher), **summary}
        log.info("teacher: %s (%d-d embeddings)", teacher.name, teacher.embed_dim)

    def train_modules(self) -> dict[str, torch.nn.Module]:
        """The distillation loss's projection, when it has one (trained and checkpointed beside the model)."""
        has = self.distill_loss is not None and any(True for _ in self.distill_loss.parameters())
        return {"distill": self.distill_loss} if has else {}

    def whiten_patches(self, n: int) -> None:
        """Initialise the image tower's patch embedding from the first ``n`` training images (as they will be
        seen: augmented and normalised); a resumed run then loads its trained weights over it."""
        images = self._images(self.sampler.batch(0, n)).to(self.device)
        try:
            filters = self.model.visual.init_patch_whitening(images)
        except ValueError as e:
            raise ValueError(f"{e}: raise init.whiten_patches (now {n}), or set it to 0 to keep the random init") from e
        log.info("patch embedding: %d filters whitened from %d images' patches", filters, n)

    def _images(self, pairs: list[Pair]) -> torch.Tensor:
        """The pairs' images as the model takes them: (B, 3, S, S) float, normalised."""
        images = torch.from_numpy(np.stack([p.image for p in pairs]))
        return normalize_batch(images, self.model.cfg.image_mean, self.model.cfg.image_std)

    def dataset_size(self) -> int:
        return len(self.sampler.source)

    def prepare(self, step: int) -> PairBatch:
        """The batch of optimiser step ``step`` (CPU work, safe to run in a background thread)."""
        pairs = self.sampler.batch(*self.positions(step))  # this process's slice of the global batch
        tokens = self.model.tokenizer.encode([t for p in pairs for t in p.texts])  # the text tower trims padding
        if self.dist.enabled:  # the mask spans the global batch: made in train_step from every slice's captions
            return PairBatch(self._images(pairs), tokens, None, [replace(p, image=None) for p in pairs])
        mask = matches(pairs, self.cfg.train.positives)
        batch = PairBatch(self._images(pairs), tokens, torch.from_numpy(mask) if mask is not None else None)
        if self.teacher is not None:
            start, size = self.positions(step)
            finite = len(self.sampler.source) > 0
            batch.raw = np.stack([p.image for p in pairs])
            batch.texts = [t for p in pairs for t in p.texts]
            batch.keys = [self.sampler.index(q)[1] for q in range(start, start + size)] if finite else None
        return batch

    def _global_positives(self, batch: PairBatch) -> torch.Tensor | None:
        """The (B, T) mask of the global batch, the same on every process (their captions, all-gathered)."""
        import torch.distributed as dist

        every: list = [None] * self.dist.world_size
        dist.all_gather_object(every, batch.meta)
        mask = matches([p for part in every for p in part], self.cfg.train.positives)
        return torch.from_numpy(mask).to(self.device) if mask is not None else None

    def _loss(self, image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None) -> ContrastiveOutput:
        t = self.cfg.train
        if not self.dist.enabled:
            return contrastive_loss(t.loss, image.float(), text.float(), self.model, positives, t.triplet_margin)
        if t.loss == "siglip" and self.model.logit.bias is None:
            raise ValueError("the SigLIP loss needs a logit bias: set model.init_logit_bias (e.g. -10)")
        out, value = global_contrastive(t.loss, image.float(), text.float(), self.model.logit(), positives,
                                        logit_bias=self.model.logit.bias, margin=t.triplet_margin,
                                        local_loss=t.local_loss)  # fmt: skip
        self._global_value = value  # the global loss, for the log (out.loss is this process's share)
        return out

    def train_step(
        self, batch: PairBatch, accum: int, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Forward and backward of one optimiser step; gradients are left in the parameters."""
        images, tokens = batch.images.to(self.device), batch.tokens.to(self.device)
        positives = batch.positives.to(self.device) if batch.positives is not None else None
        if self.dist.enabled:
            positives = self._global_positives(batch)
        extra: dict[str, float] = {}
        if accum <= 1:
            with autocast():
                out = self.model(images, tokens)
            res = self._loss(out.image_embeds, out.text_embeds, positives)
            total = res.loss
            if self.teacher is not None:
                total, extra = self._with_teacher(batch, out.image_embeds.float(), out.text_embeds.float(), res.loss)
            total.backward()
        else:
            res = self._grad_cache_step(images, tokens, positives, accum, autocast)
        loss = float(self._global_value) if self.dist.enabled else res.loss.item()
        return {"loss": loss, "i2t_acc": res.i2t_acc.item(), "t2i_acc": res.t2i_acc.item(), **extra}

    def _with_teacher(self, batch: PairBatch, image: torch.Tensor, text: torch.Tensor, contrastive: torch.Tensor):
        """The student's total loss with the teacher's terms, and those terms for the log."""
        from .distill import combine

        t_image = self.teacher.embed_images(batch.raw, batch.keys)
        t_text = self.teacher.embed_texts(batch.texts)
        terms = self.distill_loss(image, text, self.model.logit(), t_image, t_text)
        return combine(self.cfg.distill, contrastive, terms), {k: v.item() for k, v in terms.items()}

    def _grad_cache_step(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        positives: torch.Tensor | None,
        accum: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> ContrastiveOutput:
        if images.shape[0] % accum:
            raise ValueError(f"batch_size {images.shape[0]} must be divisible by accum_steps {accum}")
        img_chunks, txt_chunks = images.chunk(accum), tokens.chunk(accum)  # k captions per image stay with it
        rng_states, img_parts, txt_parts = [], [], []
        with torch.no_grad():  # pass 1: embeddings of the whole batch, no graph kept
            for ci, ct in zip(img_chunks, txt_chunks):
                rng_states.append(torch.get_rng_state())
                with autocast():
                    img_parts.append(self.model.encode_image(ci).float())
                    txt_parts.append(self.model.encode_text(ct).float())
        end_state = torch.get_rng_state()
        img = torch.cat(img_parts).requires_grad_()
        txt = torch.cat(txt_parts).requires_grad_()
        res = self._loss(img, txt, positives)
        res.loss.backward()  # gradients w.r.t. the embeddings, and the logit scale's own gradient
        i0 = t0 = 0
        for k, (ci, ct) in enumerate(zip(img_chunks, txt_chunks)):  # pass 2: replay each chunk with a graph
            torch.set_rng_state(rng_states[k])
            with autocast():
                zi = self.model.encode_image(ci).float()
                zt = self.model.encode_text(ct).float()
            ni, nt = ci.shape[0], ct.shape[0]
            torch.autograd.backward([zi, zt], [img.grad[i0 : i0 + ni], txt.grad[t0 : t0 + nt]])
            i0, t0 = i0 + ni, t0 + nt
        torch.set_rng_state(end_state)
        res.loss = res.loss.detach()
        return res

    def after_optimizer_step(self) -> None:
        self.model.logit.clamp_()

    @torch.no_grad()
    def status(self) -> dict[str, float]:
        scale = float(self.model.logit())
        out = {"logit_scale": scale, "temperature": 1.0 / scale}
        if self.model.logit.bias is not None:
            out["logit_bias"] = float(self.model.logit.bias)
        return out
