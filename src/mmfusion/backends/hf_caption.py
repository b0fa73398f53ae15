"""Image captioning with BLIP (``BlipForConditionalGeneration``) behind :class:`~mmfusion.interfaces.Captioner`.

Load it by name like any other model::

    cap = mmfusion.load("hf:Salesforce/blip-image-captioning-base")
    cap.caption(["photo.jpg"])                          # greedy: ['a dog running on the beach']
    cap.caption(["photo.jpg"], prompt="a photograph of")  # conditional: the caption continues the prompt
    cap.caption(["photo.jpg"], num_beams=3, max_new_tokens=40)
    cap.caption(["photo.jpg"], do_sample=True, temperature=0.8, top_p=0.9, seed=0)

Options are the fields of :class:`~mmfusion.interfaces.GenerationOptions`; any other name is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..interfaces import GenerationOptions, ImageInput
from .hf import as_pil_images, weights_dtype
from .hf import seeded as seeded_rng
from .hf_loading import HFFamily, load_family

CAPTION_ARCHITECTURE = "BlipForConditionalGeneration"
CAPTION_FAMILY = HFFamily(
    "blip", CAPTION_ARCHITECTURE, "BlipProcessor", "captioning", "Salesforce/blip-image-captioning-base"
)


class HFCaptioner:
    """:class:`~mmfusion.interfaces.Captioner` over a BLIP captioning model (``BlipForConditionalGeneration``).

    Images go through the model's own image processor (resize, normalisation); captions are decoded by its
    tokenizer without special tokens. Decoding is greedy by default (deterministic); ``num_beams > 1`` runs
    beam search, ``do_sample=True`` samples (repeatably with ``seed=``).

    Attributes:
        model: the ``BlipForConditionalGeneration``, in eval mode on ``device``.
        processor: its ``BlipProcessor`` (image processor and tokenizer).
        name: ``hf:<source>``, the name the model was loaded by.
        device: where the model runs.
        batch_size: images per ``generate`` call (default 16); lower it when memory is short.
    """

    def __init__(self, model, processor, name: str, device: torch.device, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.processor, self.name = model, processor, name
        self.model_type = "blip"
        self.device = device
        self.batch_size = batch_size
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        text_cfg = model.config.text_config
        self.eos_token_id = text_cfg.sep_token_id  # what BLIP's generate stops at
        self.pad_token_id = text_cfg.pad_token_id

    @classmethod
    def from_pretrained(
        cls, source: str, *, device=None, dtype=None, quantize=None, batch_size: int = 16
    ) -> HFCaptioner:
        """Load a BLIP captioning model and its processor.

        Args:
            source: a hub id (``Salesforce/blip-image-captioning-base``, read from the Hugging Face cache when
                there) or a directory written by ``save_pretrained`` (model and processor).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: CUDA when present, else CPU.
            dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or a ``torch.dtype``; default: float32 on CPU, bfloat16
                (or float16) on a GPU.
            quantize: ``"int8"`` (dynamic, CPU), ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA), or None.
            batch_size: images per ``generate`` call.

        Raises:
            ValueError: the model is not a BLIP captioning model (another family, or BLIP for VQA/retrieval).
            ModelNotFoundError: neither a local directory nor in the cache (and downloading is not possible).
        """
        loaded = load_family(source, CAPTION_FAMILY, device=device, dtype=dtype, quantize=quantize)
        return cls(loaded.model, loaded.processor, loaded.name, loaded.device, batch_size)

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the model's weights (float32 for a fully quantised model)."""
        return weights_dtype(self.model)

    def caption(
        self, images: ImageInput | Sequence[ImageInput], prompt: str | None = None, **options: Any
    ) -> list[str]:
        """Describe each image in words.

        Args:
            images: a PIL image, an image file path, or a list of either (RGB conversion and EXIF
                orientation are applied).
            prompt: text every caption starts with (conditional captioning, e.g. ``"a photograph of"``);
                None or blank for unconditional captions.
            **options: :class:`~mmfusion.interfaces.GenerationOptions` fields: ``max_new_tokens`` (30),
                ``num_beams`` (1; more runs beam search), ``do_sample`` (False), ``temperature`` (1.0) and
                ``top_p`` (1.0) when sampling, ``repetition_penalty`` (1.0), ``seed`` (None; makes sampling
                repeatable).

        Returns:
            One caption per image, in order, without special tokens or surrounding whitespace. With a prompt
            each caption starts with the prompt as given.

        Raises:
            TypeError: an unknown option name or a wrongly typed value (the message lists the valid options).
            ValueError: an option value out of range, or no images.
            ImageDecodeError: an image file that cannot be read.
        """
        prompt = prompt.strip() if prompt and prompt.strip() else None
        ids = self.generate_ids(images, prompt, **options)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        if prompt is None:
            return texts
        said = self.tokenizer.decode(self.tokenizer(prompt)["input_ids"], skip_special_tokens=True).strip()
        return [_restore_prompt(t, said, prompt) for t in texts]

    @torch.inference_mode()
    def generate_ids(
        self, images: ImageInput | Sequence[ImageInput], prompt: str | None = None, **options: Any
    ) -> list[torch.Tensor]:
        """The token ids ``generate`` produces for each image (what :meth:`caption` decodes).

        Args:
            images: as for :meth:`caption`.
            prompt: as for :meth:`caption`.
            **options: as for :meth:`caption`.

        Returns:
            One 1-D ``LongTensor`` (on CPU) per image: the start token, the prompt's tokens when there is a
            prompt, then the generated ones up to and including the end token (no padding after it).
        """
        opts = GenerationOptions.parse(options)
        gen_kwargs = opts.generate_kwargs()
        pil = as_pil_images(images)
        prompt = prompt.strip() if prompt and prompt.strip() else None
        seeded = opts.seed is not None and gen_kwargs["do_sample"]
        out: list[torch.Tensor] = []
        with seeded_rng(opts.seed if seeded else None, self.device):
            for i in range(0, len(pil), self.batch_size):
                out.extend(self._generate_batch(pil[i : i + self.batch_size], prompt, gen_kwargs))
        return out

    def _generate_batch(self, images: list, prompt: str | None, gen_kwargs: dict) -> list[torch.Tensor]:
        text = [prompt] * len(images) if prompt is not None else None
        inputs = self.processor(images=images, text=text, return_tensors="pt")
        kw: dict[str, Any] = {"pixel_values": inputs["pixel_values"].to(self.device, self.dtype)}
        start = 1  # the start token generate puts first
        if prompt is not None:
            kw["input_ids"] = inputs["input_ids"].to(self.device)
            kw["attention_mask"] = inputs["attention_mask"].to(self.device)
            start = inputs["input_ids"].shape[1] - 1  # generate drops the tokenizer's trailing [SEP]
        seqs = self.model.generate(**kw, **gen_kwargs).cpu()
        rows = []
        for row in seqs:
            ends = (row[start:] == self.eos_token_id).nonzero()
            rows.append(row[: start + int(ends[0]) + 1] if len(ends) else row)
        return rows


def _restore_prompt(text: str, said: str, prompt: str) -> str:
    """``text`` starting with ``prompt`` as written: BLIP's tokenizer gives it back lower-case (``said``)."""
    if said and text.startswith(said) and text[len(said) : len(said) + 1] in ("", " "):
        return prompt + text[len(said) :]
    return text
