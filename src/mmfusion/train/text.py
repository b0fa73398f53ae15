"""The tokenizer of a run that reads or writes text: the one it was handed (a resumed run's, a CLIP's) or a
byte-level BPE trained on the run's own texts, fitted to the model's text config."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def run_tokenizer(
    tokenizer: Tokenizer | None, corpus: Callable[[], list[str]], text_cfg, field: str, grow: bool = False
) -> Tokenizer:
    """The tokenizer a run uses, with ``text_cfg``'s context length.

    Args:
        tokenizer: one to reuse, or None to train one on ``corpus()``.
        corpus: the texts to train a tokenizer on (called only when one is trained).
        text_cfg: the model's text config (``vocab_size``, ``context_length``); ``field`` names it in errors.
        grow: a tokenizer larger than ``text_cfg.vocab_size`` grows the config (a model built from it); without
            it that is an error naming the fix.
    """
    if tokenizer is None:
        texts = corpus()
        tokenizer = Tokenizer.train(texts, text_cfg.vocab_size, text_cfg.context_length)
        log.info("trained a BPE tokenizer of %d tokens on %d texts", tokenizer.vocab_size, len(texts))
    tokenizer.context_length = text_cfg.context_length
    if tokenizer.vocab_size > text_cfg.vocab_size:
        if not grow:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but {field}.vocab_size is {text_cfg.vocab_size}; "
                f"raise {field}.vocab_size"
            )
        text_cfg.vocab_size = tokenizer.vocab_size
    return tokenizer
