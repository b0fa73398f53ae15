"""A byte-level BPE tokenizer trained on the captions (Hugging Face ``tokenizers``), saved with the model.

Byte-level means any text encodes (no unknown words), while the merges learned from the captions keep
the sequences short. Every encoded text is ``<sot> tokens... <eot> <pad>...`` of a fixed context
length; text models pool at the ``<eot>`` position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

if TYPE_CHECKING:  # tensors are made in encode(); the special ids need no torch
    import torch

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
SPECIAL_TOKENS = (PAD, UNK, SOT, EOT)
PAD_ID, UNK_ID, SOT_ID, EOT_ID = range(4)
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Texts to fixed-length token id tensors and back.

    Args:
        hf: a trained ``tokenizers.Tokenizer`` whose first four ids are ``<pad> <unk> <sot> <eot>``.
        context_length: length of every encoded sequence, ``<sot>`` and ``<eot>`` included.
    """

    def __init__(self, hf: HFTokenizer, context_length: int = 32):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (<sot>, a token, <eot>), got {context_length}")
        for i, tok in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}; was it trained by mmfusion?")
        self.hf = hf
        self.context_length = context_length
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, context_length: int = 32) -> Tokenizer:
        """Learn BPE merges from ``texts``; the vocabulary stops growing when no pair is frequent enough."""
        hf = HFTokenizer(models.BPE())
        hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, context_length)

    @classmethod
    def load(cls, path: str | Path, context_length: int) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; a text model's checkpoint keeps it as {TOKENIZER_FILE}")
        return cls(HFTokenizer.from_file(str(path)), context_length)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (the path may be a directory or the file)."""
        from ..utils.io import atomic_write_text

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self.hf.to_str())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def ids(self, text: str) -> list[int]:
        """Token ids of one text without the special tokens (memoised: captions repeat a lot)."""
        cached = self._cache.get(text)
        if cached is None:
            cached = self.hf.encode(text, add_special_tokens=False).ids
            if len(self._cache) < 200_000:
                self._cache[text] = cached
        return cached

    def encode_ids(self, texts: str | Sequence[str]) -> np.ndarray:
        """int64 token ids of shape (B, context_length): ``<sot> ids... <eot> <pad>...``, a text too long cut and
        still ended with ``<eot>``. NumPy, for a model run without torch (ONNX Runtime)."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), PAD_ID, dtype=np.int64)
        keep = self.context_length - 2
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.ids(text)[:keep], EOT_ID]
            out[row, : len(ids)] = ids
        return out

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """:meth:`encode_ids` as a torch tensor (long)."""
        import torch

        return torch.from_numpy(self.encode_ids(texts))

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence, stopping at ``<eot>`` and skipping special tokens."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        body = []
        for i in ids:
            if i == EOT_ID:
                break
            if i >= len(SPECIAL_TOKENS):
                body.append(i)
        return self.hf.decode(body)
