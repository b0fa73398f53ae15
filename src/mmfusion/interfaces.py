"""The interfaces the applications (index, service, evaluation) program against.

Native models and pretrained backends implement them, so callers never care which they have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

from PIL import Image

if TYPE_CHECKING:  # annotations only: the interfaces hold for a torch-free embedder too
    import torch


@runtime_checkable
class Embedder(Protocol):
    """Maps images and texts into one space where matching pairs are close."""

    name: str

    @property
    def embed_dim(self) -> int: ...

    def encode_image(
        self, images: Image.Image | Sequence[Image.Image] | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """(N, D) embeddings, L2-normalised unless ``normalize=False``."""
        ...

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, D) embeddings, L2-normalised unless ``normalize=False``."""
        ...


class GenerationOptionError(TypeError, ValueError):
    """A generation option with an unknown name, a wrong type or a value out of range."""


@dataclass
class GenerationOptions:
    """How text is generated; the same names as ``transformers``' ``generate`` and OpenAI's API.

    Greedy decoding by default (deterministic); ``temperature > 0`` with ``do_sample`` samples,
    ``num_beams > 1`` runs beam search.
    """

    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # makes sampling repeatable

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @classmethod
    def parse(cls, options: Mapping[str, Any], extra_names: Sequence[str] = (), **defaults: Any) -> GenerationOptions:
        """Options given as keywords (``max_new_tokens=20, do_sample=True``), checked by name, type and range.

        Args:
            options: the keywords a caller passed.
            extra_names: other keywords the caller accepts itself (named in the error for unknown ones).
            **defaults: the caller's own defaults (an answerer may generate 128 tokens, not 30).

        Raises:
            GenerationOptionError: (a TypeError and a ValueError) an unknown name, a wrong type or a value out of
                range; the message lists the valid names.
        """
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise GenerationOptionError(
                f"unknown generation option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid options are {', '.join([*names, *extra_names])}"
            )
        proto = cls()
        for key, value in options.items():
            default = getattr(proto, key)
            if key == "seed":
                ok, kind = (  # torch's generators take 64-bit seeds, signed or not
                    value is None or (isinstance(value, int) and not isinstance(value, bool)
                                      and -(2**63) <= value < 2**64),
                    "an integer from -2**63 to 2**64-1, or None",
                )  # fmt: skip
            elif isinstance(default, bool):
                ok, kind = isinstance(value, bool), "True or False"
            elif isinstance(default, int):
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
            else:
                ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            if not ok:
                raise GenerationOptionError(f"generation option {key} must be {kind}, got {value!r}")
        try:
            return cls(**{**defaults, **options})
        except ValueError as e:
            raise GenerationOptionError(str(e)) from e

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``transformers``' ``generate`` (sampling ones only when sampling)."""
        kw: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        sample = self.do_sample and self.temperature > 0
        kw["do_sample"] = sample
        if sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw


ImageInput = Union[Image.Image, str, "os.PathLike[str]"]


@runtime_checkable
class Captioner(Protocol):
    """Describes images in words."""

    name: str

    def caption(
        self, images: ImageInput | Sequence[ImageInput], prompt: str | None = None, **options: Any
    ) -> list[str]:
        """One caption per image; ``prompt`` starts every caption (conditional captioning).

        ``options`` are :class:`GenerationOptions` fields (``max_new_tokens=``, ``num_beams=``...).
        """
        ...


@runtime_checkable
class Answerer(Protocol):
    """Answers questions about images (visual question answering)."""

    name: str

    def answer(
        self, images: ImageInput | Sequence[ImageInput], questions: str | Sequence[str], **options: Any
    ) -> list[str]:
        """One answer per (image, question) pair; one question may be asked of every image."""
        ...

    def stream_answer(self, image: ImageInput, question: str, **options: Any) -> Iterator[str]:
        """The answer to one question as it is generated, piece by piece (for the service)."""
        ...


@dataclass
class Segment:
    start: float  # seconds
    end: float
    text: str


@dataclass
class Transcript:
    text: str
    segments: list[Segment] = field(default_factory=list)
    language: str | None = None


@runtime_checkable
class Transcriber(Protocol):
    """Turns speech into text with timestamps."""

    name: str

    def transcribe(self, audio: Any, sampling_rate: int | None = None, **options: Any) -> Transcript:
        """``audio``: a file path or a 1-D float array (with ``sampling_rate``)."""
        ...
