"""A captioner as a re-ranker: the score of (image, caption) is the caption's log-likelihood given the image.

A dual encoder compares two vectors made apart and so reads captions as bags of words; a captioner's decoder
writes the caption word by word while attending to the image's patches, so "a red circle and a blue square" and "a
blue circle and a red square" get different likelihoods when it has learned to say which shape is red (the
generative scores of VisualGPTScore, Lin et al., 2023, which lead discriminative CLIPs on ARO and SugarCrepe).
Any captioner run re-ranks as it is (``mmfusion search --rerank CAPTION_RUN``); one fine-tuned with
``mmfusion train rerank --preset caption-tiny --init.from_captioner=RUN`` also learns to rank its likelihoods over
the hard negatives a CLIP confuses (:class:`~mmfusion.train.rerank_task.CaptionRerankTask`).

The score is the log-likelihood of the caption's words, summed, without the end token: a captioner trained on whole
descriptions gives "a red circle" followed by the end a low probability for a scene where more is to be said, and a
search for "a red circle" asks whether a red circle is there, not whether it is all there is (with the end token
counted, semantic P@1 of single-object queries fell from 0.99 to 0.82 re-ranking a CLIP's top 20). For
text-to-image re-ranking the caption is fixed and only the images vary, so its prior cancels; between captions
(image to text) the sum favours neither side of a swap (the same words in another order).

A captioner knows which colour goes with which shape but less about what a contrastive CLIP learned well (single
objects, counts), so a search mixes the two: the re-ranked score is the log-likelihood plus
``first_stage_weight`` times the first stage's score (:func:`mmfusion.index.rerank.rerank_results`): for a text
query, its cosine similarity, the scale the weight was chosen on; a query that also holds images, ids or an
ensemble brings that query's combined score, which the weight was not tuned for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ..data.images import ImageTransform
from .captioner import CaptionModel
from .reranker import ImageMemory, PairScoring, TextFeatures

# the first stage's cosine counts this many nats of the caption's likelihood: clip-tiny's logit scale, chosen on
# ShapesWorld's validation split (semantic P@1 of the top 20 re-ranked, benchmarks/bench_rerank_weight.py): the
# shipped recipe's captioner is best at 13-26 (0.939 / 0.938, 0.925 at 50); one that never learned relations
# leans on the CLIP more (the 8-minute recipe's: 0.840 at 50, 0.839 at 26)
FIRST_STAGE_WEIGHT = 26.0
RERANKING_FAMILIES = ("reranker", "captioner")  # what as_reranker takes


class CaptionRanker(PairScoring):
    """(image, caption) -> log P(caption's words | image) under a :class:`CaptionModel`, with a re-ranker's
    interface.

    Args:
        captioner: a trained captioner (its tokenizer encodes the captions).
        first_stage_weight: what a search adds of the first stage's cosine similarity (0: the likelihood alone).
        end: count the end token too (the probability that the caption is the whole description).
    """

    family = "reranker"
    score_chunk = 1024  # pairs per decoder pass when scoring many (each pair is a whole caption's logits)

    def __init__(self, captioner: CaptionModel, first_stage_weight: float = FIRST_STAGE_WEIGHT, end: bool = False):
        if captioner.tokenizer is None:
            raise ValueError(f"captioner {captioner.name!r} has no tokenizer; load a trained checkpoint")
        self.captioner, self.first_stage_weight, self.end = captioner, float(first_stage_weight), end
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
        return self.captioner.sequence_logprob(images.tokens, texts.tokens[text_index], image_index, end=self.end)


def as_reranker(model, spec: str = "the model"):
    """What re-ranks, from a loaded checkpoint: a cross-attention :class:`~.reranker.Reranker` as it is, a captioner
    as a :class:`CaptionRanker` (anything else is refused, naming what fits)."""
    family = getattr(model, "family", None)
    if family in RERANKING_FAMILIES:
        return CaptionRanker(model) if family == "captioner" else model
    raise ValueError(
        f"{spec} is a {family or type(model).__name__} model, not a re-ranker: give a captioner run (mmfusion train "
        "caption, or train rerank --preset caption-tiny) or a cross-attention re-ranker (mmfusion train rerank "
        "--init.from_clip=CLIP_RUN)"
    )
