"""An image captioner: the ViT of the CLIP family as encoder, a Transformer decoder with cross-attention.

Trained with teacher forcing (cross-entropy of each next token, padding ignored). Generation uses the decoder's
key-value cache, with greedy decoding, beam search (length penalty) or temperature/top-p sampling
(:mod:`mmfusion.modules.generation`). The image encoder can start from a trained CLIP checkpoint
(:meth:`CaptionModel.from_clip`), frozen or fine-tuned. Implements :class:`mmfusion.interfaces.Captioner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import field
from ..data.images import CLIP_MEAN, CLIP_STD, ImageTransform
from ..data.tokenizer import EOT_ID, PAD_ID, SOT_ID, Tokenizer
from ..interfaces import GenerationOptions
from ..modules.decoder import DecoderConfig, TextDecoder
from ..modules.encoders import VisionConfig, VisionTransformer
from ..modules.generation import generate


@dataclass
class CaptionerConfig:
    """An encoder-decoder captioner."""

    vision: VisionConfig = field(factory=VisionConfig, help="image encoder (a ViT; the CLIP family's)")
    decoder: DecoderConfig = field(factory=DecoderConfig, help="text decoder")
    vision_embed_dim: int = field(128, "the ViT's projection width (kept so CLIP image towers load as they are)")
    freeze_vision: bool = field(False, "keep the image encoder's weights fixed while training")
    image_mean: tuple[float, ...] = field(CLIP_MEAN, "per-channel mean for image normalisation")
    image_std: tuple[float, ...] = field(CLIP_STD, "per-channel std for image normalisation")
    num_beams: int = field(1, "default decoding: 1 greedy, more for beam search")
    length_penalty: float = field(1.0, "beam search: scores are divided by length ** length_penalty")
    max_new_tokens: int = field(30, "default longest caption in tokens")
    answers_questions: bool = field(
        False, "trained on questions too (`mmfusion train vqa --preset caption-tiny`): answer() generates answers"
    )


class CaptionModel(nn.Module):
    """Images -> captions.

    Args:
        cfg: the architecture and decoding defaults.
        tokenizer: the BPE tokenizer of the captions (saved with the model).
        name: a label for reports and the service.
    """

    family = "captioner"

    def __init__(self, cfg: CaptionerConfig, tokenizer: Tokenizer | None = None, name: str = "captioner"):
        super().__init__()
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name
        self.visual = VisionTransformer(cfg.vision, cfg.vision_embed_dim)
        self.decoder = TextDecoder(cfg.decoder, cfg.vision.width)
        if cfg.freeze_vision:
            self.visual.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.decoder.pos_embed.device

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(self.cfg.vision.image_size, self.cfg.image_mean, self.cfg.image_std)

    @property
    def answers_questions(self) -> bool:
        """Whether :meth:`answer` works (the model was trained on questions); the service and ``mmfusion ask`` read
        it to refuse a caption-only run as an answerer."""
        return bool(self.cfg.answers_questions)

    @classmethod
    def from_clip(cls, clip, cfg: CaptionerConfig | None = None, freeze: bool = False, name: str = "captioner"):
        """A captioner whose image encoder (and tokenizer) start as a trained CLIP's (load a checkpoint with
        :func:`mmfusion.load` first)."""
        if getattr(clip, "family", None) != "clip":
            raise ValueError(f"{getattr(clip, 'name', clip)!r} is not a CLIP model; from_clip needs one")
        cfg = cfg or CaptionerConfig()
        cfg.vision, cfg.vision_embed_dim, cfg.freeze_vision = clip.cfg.vision, clip.cfg.embed_dim, freeze
        cfg.image_mean, cfg.image_std = clip.cfg.image_mean, clip.cfg.image_std
        if clip.tokenizer is not None:
            cfg.decoder.vocab_size = max(cfg.decoder.vocab_size, clip.tokenizer.vocab_size)
        model = cls(cfg, clip.tokenizer, name)
        model.visual.load_state_dict(clip.visual.state_dict())
        if freeze:
            model.visual.requires_grad_(False)
        return model

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed -> (B, 1 + N, vision width)."""
        if self.cfg.freeze_vision:
            with torch.no_grad():
                return self.visual.forward_features(images)
        return self.visual.forward_features(images)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, L - 1, vocab) for captions ``tokens`` (B, L) (``<sot> ... <eot> <pad>...``).
        Sequence ``i`` reads image ``image_index[i]`` (default: image i), each image encoded once."""
        memory = self.image_tokens(images)
        if image_index is not None:
            memory = memory[image_index]
        return self.decoder(tokens[:, :-1], memory=memory)

    def loss(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher-forced cross-entropy over the real tokens (padding ignored), and next-token accuracy. With
        ``prompt_lengths`` (B,), the first tokens of each sequence (``<sot>`` and a question) are context only:
        the loss is on what follows them (the answer)."""
        L = int((tokens != PAD_ID).sum(dim=1).max())  # no column of padding only
        tokens = tokens[:, :L]
        logits = self(images, tokens, image_index)
        target = tokens[:, 1:]
        if prompt_lengths is not None:  # target j is token j + 1: a prompt token while j + 1 < prompt length
            in_prompt = (
                torch.arange(L - 1, device=tokens.device)[None, :] + 1 < prompt_lengths.to(tokens.device)[:, None]
            )
            target = target.masked_fill(in_prompt, PAD_ID)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=PAD_ID)
        real = target != PAD_ID
        acc = ((logits.argmax(-1) == target) & real).sum() / real.sum().clamp_min(1)
        return loss, {"loss": float(loss.detach()), "token_acc": float(acc)}

    def sequence_logprob(
        self, memory: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None, end: bool = True
    ) -> torch.Tensor:
        """(P,) log-probability of each caption ``tokens`` (P, L) (``<sot> ... <eot> <pad>...``) given its image:
        the sum over its tokens after ``<sot>``, ``<eot>`` included unless ``end`` is False (the words alone: not
        whether the caption would stop there). ``memory`` (B, M, W) is :meth:`image_tokens`; caption ``p`` reads
        image ``image_index[p]`` (default: image p); the cross-attention keys and values are computed once for each
        image some caption reads, and for no other."""
        from ..modules.decoder import KVCache

        L = int((tokens != PAD_ID).sum(dim=1).max())
        tokens = tokens[:, :L]
        if image_index is not None:
            used, image_index = torch.unique(image_index, return_inverse=True)
            memory = memory[used]
        kv = self.decoder.start(memory).memory
        if image_index is not None:
            kv = [(k[image_index], v[image_index]) for k, v in kv]
        logits = self.decoder(tokens[:, :-1], cache=KVCache(kv))
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (P, L - 1)
        counted = tokens[:, 1:] != PAD_ID
        if not end:
            counted &= tokens[:, 1:] != EOT_ID
        return (logp * counted).sum(dim=1)

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        from ..data.images import load_image

        items = images if isinstance(images, (list, tuple)) else [images]
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in items]
        return self.transform(pil).to(self.device)

    @torch.no_grad()
    def generate_ids(
        self, images, use_cache: bool = True, prompt: torch.Tensor | None = None, **options: Any
    ) -> list[list[int]]:
        """Token ids of a caption per image (``options``: :class:`GenerationOptions` fields and
        ``length_penalty``), or of what follows each row of ``prompt`` (B, P) (see :meth:`answer`)."""
        length_penalty = options.pop("length_penalty", self.cfg.length_penalty)
        defaults = {"max_new_tokens": self.cfg.max_new_tokens, "num_beams": self.cfg.num_beams}
        opts = GenerationOptions.parse(options, extra_names=("length_penalty",), **defaults)
        memory = self.image_tokens(self._pixels(images))
        return generate(self.decoder, memory, sot_id=SOT_ID, eot_id=EOT_ID, pad_id=PAD_ID,
                        max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams, length_penalty=length_penalty,
                        do_sample=opts.do_sample, temperature=opts.temperature, top_p=opts.top_p,
                        repetition_penalty=opts.repetition_penalty, seed=opts.seed, use_cache=use_cache,
                        prompt=prompt)  # fmt: skip

    def caption(self, images, prompt: str | None = None, **options: Any) -> list[str]:
        """One caption per image (PIL images, paths, or a preprocessed tensor)."""
        if prompt is not None:
            raise ValueError(f"captioner {self.name!r} does not take a prompt (conditional captioning is for BLIP "
                             "models); leave the prompt out")  # fmt: skip
        if self.tokenizer is None:
            raise RuntimeError(f"captioner {self.name!r} has no tokenizer; load a trained checkpoint")
        was_training = self.training
        self.eval()
        try:
            return [self.tokenizer.decode(ids) for ids in self.generate_ids(images, **options)]
        finally:
            self.train(was_training)

    def prompt_ids(self, question: str) -> list[int]:
        """``<sot>`` and the question's tokens: the prompt an answer follows (in training and in :meth:`answer`)."""
        if self.tokenizer is None:
            raise RuntimeError(f"captioner {self.name!r} has no tokenizer; load a trained checkpoint")
        room = self.cfg.decoder.context_length - 8  # leave room for the answer
        return [SOT_ID, *self.tokenizer.ids(question)[:room]]

    @torch.no_grad()
    def answer(self, images, questions: str | Sequence[str], **options: Any) -> list[str]:
        """Answers generated by the decoder after each question (the Answerer interface); one question may be asked
        of every image, or one image asked several questions. Needs a model trained on questions
        (``mmfusion train vqa --preset caption-tiny``)."""
        if not self.cfg.answers_questions:
            raise RuntimeError(f"captioner {self.name!r} was trained on captions only; to answer questions, train "
                               "one with questions: mmfusion train vqa --preset caption-tiny")  # fmt: skip
        if isinstance(images, torch.Tensor):  # preprocessed (B, 3, H, W)
            items = images if images.dim() == 4 else images[None]
        else:
            items = list(images) if isinstance(images, (list, tuple)) else [images]
        no_system_prompt(self.name, options)
        qs = [questions] if isinstance(questions, str) else list(questions)
        if len(qs) == 1 and len(items) > 1:
            qs = qs * len(items)
        if len(items) not in (1, len(qs)):
            raise ValueError(f"{len(qs)} questions for {len(items)} images: give one per image, or one for all")
        image_of = list(range(len(qs))) if len(items) == len(qs) else [0] * len(qs)  # one image: every question
        options.setdefault("max_new_tokens", 8)
        prompts = [self.prompt_ids(q) for q in qs]
        out: list[str] = [""] * len(qs)
        was_training = self.training
        self.eval()
        try:
            pixels = self._pixels(items)  # each image decoded and encoded once
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):  # prompts of one length run together (no padding inside a prompt)
                by_length.setdefault(len(p), []).append(i)
            for rows in by_length.values():
                prompt = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
                batch = pixels[[image_of[i] for i in rows]]
                for i, ids in zip(rows, self.generate_ids(batch, prompt=prompt, **options), strict=True):
                    out[i] = self.tokenizer.decode(ids)
        finally:
            self.train(was_training)
        return out

    def stream_answer(self, image, question: str, **options: Any):
        """The answer in one piece (answers are a few tokens)."""
        yield self.answer([image], question, **options)[0]


def no_system_prompt(name: str, options: dict[str, Any]) -> None:
    """mmfusion's own answerers read the question alone: a system prompt (a chat model's) is refused by name."""
    if "system" in options:
        raise ValueError(f"{name!r} answers the question alone and takes no system prompt; leave it out (system "
                         "prompts are for chat models such as Qwen2.5-VL)")  # fmt: skip


def caption_batches(model: CaptionModel, images: Sequence, batch_size: int = 64, **options: Any) -> list[str]:
    """Captions for many images, a batch at a time."""
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        out += model.caption(list(images[i : i + batch_size]), **options)
    return out
