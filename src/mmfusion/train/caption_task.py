"""Training adapter for the captioner: images and their captions, teacher-forced cross-entropy.

Data comes from the same pair sources as CLIP training (the ShapesWorld stream or a folder with captions.jsonl),
one caption per image per step, with the same caption-safe augmentation. The image encoder can start from a
trained CLIP checkpoint (``init.from_clip``), frozen (``init.freeze_vision``) or fine-tuned; the tokenizer
then is the CLIP's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from ..data.images import normalize_batch
from ..data.pairs import PairSampler
from ..data.tokenizer import PAD_ID, Tokenizer
from ..models.captioner import CaptionModel
from ..models.checkpoint import load
from ..models.registry import build_model
from .clip_task import build_pair_source, first_epoch_in_order, trained_on
from .config import RunConfig
from .text import run_tokenizer
from .trainer import TaskDefaults

log = logging.getLogger(__name__)


class CaptionTask(TaskDefaults):
    """Batches, loss and checkpoints of a captioner run (see :class:`mmfusion.train.trainer.Trainer`)."""

    name = "caption"

    def __init__(self, cfg: RunConfig, model: CaptionModel, sampler: PairSampler, device: torch.device):
        self.cfg, self.model, self.sampler, self.device = cfg, model, sampler, device

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, tokenizer: Tokenizer | None = None) -> CaptionTask:
        mcfg = cfg.model_config("captioner")
        cc = cfg.init
        if cc.from_clip:
            model = CaptionModel.from_clip(load(cc.from_clip), mcfg, freeze=cc.freeze_vision, name=cfg.preset)
            if tokenizer is None:
                tokenizer = model.tokenizer
            log.info("image encoder from %s (%s)", cc.from_clip, "frozen" if cc.freeze_vision else "fine-tuned")
        else:
            mcfg.freeze_vision = cc.freeze_vision
            model = None
        source = build_pair_source(cfg, mcfg.vision.image_size)
        corpus = source.caption_corpus
        tokenizer = run_tokenizer(tokenizer, lambda: corpus(cfg.data.tokenizer_captions), mcfg.decoder, "model.decoder")
        if model is None:
            model = build_model("captioner", mcfg, tokenizer, name=cfg.preset)
        model.tokenizer = tokenizer
        model = model.to(device)
        model.meta = {"trained_on": {**trained_on(cfg), "from_clip": cc.from_clip}}
        first = cfg.data.caption_pick in ("auto", "first")
        sampler = PairSampler(source, cfg.train.seed, cfg.data.augment, first_epoch_in_order(cfg, source),
                              captions_per_image=1, first_caption=first)  # fmt: skip
        log.info("captioner: %s trainable parameters",
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")  # fmt: skip
        return cls(cfg, model, sampler, device)

    def dataset_size(self) -> int:
        return len(self.sampler.source)

    def prepare(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and caption tokens of optimiser step ``step`` (CPU work, safe in a background thread)."""
        pairs = self.sampler.batch(*self.positions(step))  # this process's part of the global batch
        images = torch.from_numpy(np.stack([p.image for p in pairs]))
        tokens = self.model.tokenizer.encode([p.texts[0] for p in pairs])
        return normalize_batch(images, self.model.cfg.image_mean, self.model.cfg.image_std), tokens

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], accum: int,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:  # fmt: skip
        images, tokens = batch[0].to(self.device), batch[1].to(self.device)
        return sequence_step(self.model, images, tokens, accum, autocast)


def sequence_step(
    model: CaptionModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    accum: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    prompts: torch.Tensor | None = None,
    owner: torch.Tensor | None = None,
) -> dict[str, float]:
    """Forward and backward of a captioner's teacher-forced loss over sequences ``tokens`` (N, L) reading
    ``images`` (B, ...): sequence ``i`` reads image ``owner[i]`` (default: image i) and is supervised after its
    first ``prompts[i]`` tokens (default: all but ``<sot>``). Micro-batches of ``accum`` image groups, each with
    its sequences, are weighted by their supervised tokens, so accumulation equals one big step."""
    positions = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :]
    supervised = tokens[:, 1:] != PAD_ID
    if prompts is not None:
        supervised &= positions >= prompts[:, None]
    total_sup = supervised.sum().clamp_min(1)
    total: dict[str, float] = {"loss": 0.0, "token_acc": 0.0}
    n = len(images)
    for part in torch.arange(n, device=tokens.device).chunk(max(1, min(accum, n))):
        rows = part if owner is None else torch.isin(owner, part).nonzero().squeeze(1)
        share = float(supervised[rows].sum() / total_sup)
        with autocast():
            loss, stats = model.loss(images[part], tokens[rows], None if prompts is None else prompts[rows],
                                     None if owner is None else owner[rows] - part[0])  # fmt: skip
        (loss * share).backward()
        for k in total:
            total[k] += stats[k] * share
    return total
