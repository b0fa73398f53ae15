"""A captioner as a re-ranker: the score of (image, caption) is the caption's log-likelihood given the image.

A dual encoder compares two vectors made apart and so reads captions as bags of words; a captioner's decoder
writes the caption word by word while attending to the image's patches, so "a red circle and a blue square" and "a
blue circle and a red square" get different likelihoods when it has learned to say which shape is red (the
generative scores of VisualGPTScore, Lin et al., 2023, which lead discriminative CLIPs on ARO and SugarCrepe).
Any captioner run re-ranks as it is (``mmfusion search --rerank CAPTION_RUN``); one fine-tuned with
``mmfusion train rerank --preset caption-tiny --init.from_captioner=RUN`` also learns to rank its likelihoods over
the hard negatives a CLIP confuses (:class:`~mmfusion.train.rerank_task.CaptionRerankTask`).

For text-to-image re-ranking the caption is fixed and only the images vary, so the caption's own prior cancels and
the raw log-likelihood ranks the images; between captions (image to text) it is summed over tokens, which favours
neither side of a swap (the same words in another order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ..data.images import ImageTransform
from .captioner import CaptionModel
from .reranker import ImageMemory, PairScoring, TextFeatures


class CaptionRanker(PairScoring):
    """(image, caption) -> log P(caption | image) under a :class:`CaptionModel`, with a re-ranker's interface.

    Args:
        captioner: a trained captioner (its tokenizer encodes the captions).
    """

    family = "reranker"
    score_chunk = 1024  # pairs per decoder pass when scoring many (each pair is a whole caption's logits)

    def __init__(self, captioner: CaptionModel):
        if captioner.tokenizer is None:
            raise ValueError(f"captioner {captioner.name!r} has no tokenizer; load a trained checkpoint")
        self.captioner = captioner
        self.name = captioner.name
        self.meta = getattr(captioner, "meta", {})

    @property
    def device(self) -> torch.device:
        return self.captioner.device

    @property
    def transform(self) -> ImageTransform:
        return self.captioner.transform

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.captioner.tokenizer.encode(texts)

    def eval(self) -> CaptionRanker:
        self.captioner.eval()
        return self

    def encode_images(self, images: torch.Tensor | Sequence[Image.Image]) -> ImageMemory:
        """Preprocessed images (B, 3, H, W), or PIL images -> their patch tokens (no embedding: ``embeds`` empty)."""
        x = images if isinstance(images, torch.Tensor) else self.transform(images)
        tokens = self.captioner.image_tokens(x.to(self.device))
        return ImageMemory(tokens, tokens.new_zeros(len(tokens), 0))

    def encode_texts(self, texts: torch.Tensor | str | Sequence[str]) -> TextFeatures:
        """Token ids (T, L), or strings -> the ids themselves, cut after the longest caption's ``<eot>``."""
        from ..data.tokenizer import PAD_ID

        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        lengths = (tokens != PAD_ID).sum(dim=1)
        tokens = tokens[:, : int(lengths.max())] if len(tokens) else tokens
        return TextFeatures(tokens.to(self.device), lengths - 1, torch.zeros(len(tokens), 0))

    def score_pairs(
        self, images: ImageMemory, texts: TextFeatures, image_index: torch.Tensor, text_index: torch.Tensor
    ) -> torch.Tensor:
        """(P,) log-likelihoods of the pairs (image ``image_index[p]``, caption ``text_index[p]``)."""
        return self.captioner.sequence_logprob(images.tokens, texts.tokens[text_index], image_index)


def as_reranker(model, spec: str = "the model"):
    """What re-ranks, from a loaded checkpoint: a cross-attention :class:`~.reranker.Reranker` as it is, a captioner
    as a :class:`CaptionRanker` (anything else is refused, naming what fits)."""
    family = getattr(model, "family", None)
    if family == "reranker":
        return model
    if family == "captioner":
        return CaptionRanker(model)
    raise ValueError(
        f"{spec} is a {family or type(model).__name__} model, not a re-ranker: give a captioner run (mmfusion train "
        "caption, or train rerank --preset caption-tiny) or a cross-attention re-ranker (mmfusion train rerank "
        "--init.from_clip=CLIP_RUN)"
    )
