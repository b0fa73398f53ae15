"""Visual question answering with Qwen2.5-VL (``qwen2_5_vl``) behind :class:`~mmfusion.interfaces.Answerer`.

::

    vqa = mmfusion.load("hf:Qwen/Qwen2.5-VL-3B-Instruct")
    vqa.answer(["photo.jpg"], "How many dogs?")                  # ['Two.']
    for piece in vqa.stream_answer("photo.jpg", "Describe it."):  # text as it is generated
        print(piece, end="", flush=True)

Questions go through the model's chat interface: each (image, question) pair becomes a conversation
``[{"role": "system", ...} (optional), {"role": "user", "content": [{"type": "image"}, {"type": "text", ...}]}]``,
the processor's chat template renders it with the assistant turn opened (``add_generation_prompt=True``),
``generate`` runs, and only the new tokens are decoded. Several pairs run as one batch, left-padded (a
decoder-only model continues from the last position, so the padding must be on the left).

Options (``answer`` and ``stream_answer``): the :class:`~mmfusion.interfaces.GenerationOptions` fields
(``max_new_tokens`` -- default :data:`DEFAULT_MAX_NEW_TOKENS` here --, ``num_beams``, ``do_sample``,
``temperature``, ``top_p``, ``repetition_penalty``, ``seed``), ``system=`` (a system prompt; the chat
template puts Qwen's default one when there is none) and ``messages=`` (a whole conversation, in place of
the image and question). These options are the whole truth: a checkpoint's ``generation_config.json``
sampling defaults (Qwen2.5-VL ships ``top_k=1, temperature=0.1, repetition_penalty=1.05``) do not apply.
Sampling draws from the top-p nucleus with no top-k cut (as OpenAI's API does). Any other option name
raises ``ValueError`` naming the valid ones.

``messages=`` takes the OpenAI-like chat format the HTTP service receives: a list of ``{"role": "system" |
"user" | "assistant", "content": str | [parts]}``, a part being ``{"type": "text", "text": ...}``,
``{"type": "image", "image": PIL image | path | array}`` or ``{"type": "image_url", "image_url": {"url":
path | file:// URL | data:image/...;base64,...}}``. Remote ``http(s)`` URLs are not fetched here (the
caller downloads them). ``answer(messages=[conv1, conv2])`` answers several conversations in one batch.

Image size: Qwen2.5-VL turns every 28x28 pixels into one token, so a 12-megapixel photo would be ~15,000
tokens. The image processor resizes each image to at most ``max_pixels`` pixels (aspect ratio kept, sides
multiples of 28); the default :data:`DEFAULT_MAX_PIXELS` (1280 x 28 x 28, at most 1280 tokens an image) is
also what Qwen's model card suggests. The checkpoint's own limit applies when it is smaller.

The processor without torchvision
---------------------------------
Recent ``transformers`` (5.x) build ``Qwen2_5_VLProcessor`` from three parts: the image processor, the
tokenizer and the *video* processor, and ``AutoProcessor.from_pretrained`` loads all three; the video
processor (``Qwen2VLVideoProcessor``) needs torchvision and raises ``ImportError`` without it, although
images never touch it. The image processor has two backends: ``Qwen2VLImageProcessor`` (torchvision, the
"fast" one in 5.x naming) and ``Qwen2VLImageProcessorPil`` (PIL + NumPy), and ``AutoImageProcessor`` falls
back to the PIL one when torchvision is missing. So when the standard processor cannot be built,
:func:`load_vqa_processor` loads :class:`ImageOnlyQwen2_5_VLProcessor`: ``Qwen2_5_VLProcessor`` with the
``video_processor`` argument removed from ``__init__`` (``ProcessorMixin`` discovers the parts from that
signature), loaded with the ordinary ``from_pretrained``, i.e. ``AutoImageProcessor`` (PIL backend) +
``AutoTokenizer`` + the checkpoint's chat template. Everything images need (image-token expansion from
``image_grid_thw``, ``mm_token_type_ids``, the chat template) is inherited unchanged; video input is not
supported through it. With torchvision installed, the standard processor (and its torchvision image
backend) is used, whose resizing differs from PIL's by rounding only.

Streaming
---------
:meth:`HFAnswerer.stream_answer` runs ``generate`` in a background thread feeding a
``transformers.TextIteratorStreamer`` and yields the text pieces (whole words, as the streamer releases
them) in the caller's thread. Options are checked and inputs prepared when it is called, before the first
piece. An exception in ``generate`` ends the stream and is re-raised in the caller. Leaving early (``break``,
``close()``, an exception in the consumer, or the generator being garbage-collected) sets a stop flag that
``generate`` checks after every token, and the thread is joined, so it costs at most one more decoding step
and no thread is left behind. A generator that is neither exhausted nor closed (kept referenced but
abandoned) lets its thread run until the answer is complete (``max_new_tokens`` at most), then end.
Beam search (``num_beams > 1``) cannot stream: the answer comes as one piece when it is complete.

User text is never trusted with control tokens: ``<|im_end|>``, ``<|im_start|>`` or ``<|image_pad|>`` in a
question or message are encoded as plain text (``apply_chat_template(..., sanitize_control_tokens=True)``),
so text cannot open a new turn, play the system or fake an image. With a ``transformers`` too old for
that, text containing a control token is refused (``ValueError``).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS as DECODE_MAX_PIXELS
from ..data.images import ImageDecodeError, to_rgb
from ..interfaces import GenerationOptions, ImageInput
from .hf import as_pil_images, load_processor, locate, read_config, require_transformers, seeded
from .hf_loading import load_with_processor

DEFAULT_MAX_PIXELS = 1280 * 28 * 28  # 1,003,520 pixels: at most 1280 visual tokens an image
DEFAULT_MAX_NEW_TOKENS = 128
GENERATION_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GenerationOptions))
OPTION_NAMES = (*GENERATION_OPTION_NAMES, "system", "messages")
ROLES = ("system", "user", "assistant")


# ---- the processor ---------------------------------------------------------------------------------------


@functools.cache
def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without a video processor (which needs torchvision): images and text only.

        ``ProcessorMixin`` finds a processor's parts in its ``__init__`` signature, so leaving
        ``video_processor`` out of it makes ``from_pretrained`` load only the image processor and tokenizer.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnlyQwen2_5_VLProcessor.__qualname__ = "ImageOnlyQwen2_5_VLProcessor"
    return ImageOnlyQwen2_5_VLProcessor


def __getattr__(name: str):  # the class needs transformers: built on first use
    if name == "ImageOnlyQwen2_5_VLProcessor":
        return _image_only_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_vqa_processor(source: str, local_only: bool):
    """The checkpoint's processor: the standard one, or the image-only one where torchvision is missing."""
    transformers = require_transformers()
    try:
        return load_processor(transformers.AutoProcessor, source, local_only)
    except ImportError as e:
        if "torchvision" not in str(e).lower():
            raise
    return load_processor(_image_only_processor_class(), source, local_only)


# ---- options, conversations, images ----------------------------------------------------------------------


def generation_options(options: Mapping[str, Any], default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    """:class:`GenerationOptions` from keyword options, with clear errors for wrong names and types."""
    return GenerationOptions.parse(options, extra_names=("system", "messages"), max_new_tokens=default_max_new_tokens)


def _generate_kwargs(opts: GenerationOptions) -> dict[str, Any]:
    """``generate`` keyword arguments that override every sampling default a checkpoint ships."""
    kw = opts.generate_kwargs()
    kw.setdefault("repetition_penalty", 1.0)
    if kw["do_sample"]:
        kw["top_k"] = 0  # nucleus sampling only: no top-k cut (Qwen's generation_config.json says top_k=1)
    return kw


def _image_from_url(url: str) -> Image.Image:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ImageDecodeError("a data: image URL must be base64-encoded (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(payload, validate=False)
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > DECODE_MAX_PIXELS:
                raise ImageDecodeError(f"{img.width}x{img.height} pixels is over the limit of {DECODE_MAX_PIXELS:,}")
            img.load()
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"data: URL is not a readable image ({type(e).__name__}: {e})") from e
        return to_rgb(img)
    if url.startswith(("http://", "https://")):
        raise ValueError(f"remote image URLs are not fetched here ({url[:80]}); download it and pass the file")
    path = url[len("file://") :] if url.startswith("file://") else url
    return _pil(path)


def _pil(image: Any) -> Image.Image:
    try:
        return as_pil_images([image])[0]
    except ImageDecodeError as e:
        if isinstance(image, (str, os.PathLike)):
            raise ImageDecodeError(f"{os.fspath(image)}: {e}") from e
        raise


def _single_chat(image: ImageInput | np.ndarray | None, question: str, system: str | None) -> list[dict[str, Any]]:
    if not isinstance(question, str):
        raise ValueError(f"a question must be a string, got {type(question).__name__}")
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image", "image": _pil(image)})
    content.append({"type": "text", "text": question})
    chat = [{"role": "user", "content": content}]
    if system is not None:
        chat.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return chat


def chat_images(chat: Sequence[Mapping[str, Any]]) -> list[Image.Image]:
    """The images of a conversation in the chat template's format, in order."""
    return [part["image"] for msg in chat for part in msg["content"] if part.get("type") == "image"]


def convert_messages(messages: Sequence[Mapping[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
    """An OpenAI-like conversation -> the chat template's format: ``{"role", "content": [parts]}`` messages
    whose parts are ``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL image}``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r:.80}")
        role = msg["role"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        content = msg.get("content")
        parts = [] if content is None else [content] if isinstance(content, str) else content
        if not isinstance(parts, Sequence):
            raise ValueError(f"messages[{i}]: content must be a string or a list of parts")
        out: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, Mapping):
                raise ValueError(f"messages[{i}]: a content part must be a dict, got {type(part).__name__}")
            kind = part.get("type") or next((k for k in ("image", "image_url") if k in part), "text")
            if kind == "text":
                out.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image":
                if part.get("image") is None:
                    raise ValueError(f"messages[{i}]: an image part needs 'image' (a PIL image or a path)")
                out.append({"type": "image", "image": _pil(part["image"])})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, Mapping) else ref
                if not isinstance(url, str):
                    raise ValueError(f"messages[{i}]: image_url needs a url string")
                out.append({"type": "image", "image": _image_from_url(url)})
            else:
                raise ValueError(
                    f"messages[{i}]: content type {kind!r} is not supported (text, image and image_url are)"
                )
        chat.append({"role": role, "content": out})
    if system is not None:
        if chat[0]["role"] == "system":
            raise ValueError("system= given, but the messages already start with a system message")
        chat.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    if chat[-1]["role"] == "assistant":
        raise ValueError("the last message is the assistant's: there is nothing to answer")
    return chat


def _is_conversation_batch(messages: Any) -> bool:
    return (
        isinstance(messages, Sequence)
        and not isinstance(messages, (str, bytes))
        and len(messages) > 0
        and all(isinstance(m, Sequence) and not isinstance(m, (str, bytes)) for m in messages)
    )


def _can_sanitize(processor) -> bool:
    """Whether the processor's ``apply_chat_template`` can encode control tokens in user text as plain text."""
    import inspect

    try:
        params = inspect.signature(processor.apply_chat_template).parameters
    except (TypeError, ValueError):
        return False
    return "sanitize_control_tokens" in params and "processor_kwargs" in params


def _refuse_control_tokens(chat: Sequence[Mapping[str, Any]], tokenizer) -> None:
    tokens = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    tokens += [t for t in getattr(tokenizer, "all_special_tokens", []) if t not in tokens]
    for msg in chat:
        for part in msg["content"]:
            text = part.get("text") if part.get("type") == "text" else None
            for token in tokens if text else ():
                if token and token in text:
                    raise ValueError(
                        f"the text contains the control token {token!r}; this transformers version cannot encode it "
                        "as plain text (upgrade transformers, or remove it)"
                    )


class _StopFlag:
    """A stopping criterion that ends ``generate`` once ``event`` is set (checked after every token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# ---- the adapter -----------------------------------------------------------------------------------------


class HFAnswerer:
    """:class:`~mmfusion.interfaces.Answerer` over ``Qwen2_5_VLForConditionalGeneration`` (see the module doc)."""

    def __init__(
        self,
        model,
        processor,
        name: str,
        device: torch.device,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_pixels: int | None = None,
        batch_size: int = 8,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ):
        self.model, self.processor, self.name, self.device = model, processor, name, torch.device(device)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.default_max_new_tokens = default_max_new_tokens
        size = getattr(self.image_processor, "size", None) or {}
        self._processor_max = _size_value(size, "longest_edge", "max_pixels")
        self._processor_min = _size_value(size, "shortest_edge", "min_pixels")
        self._min_pixels = min_pixels
        self.max_pixels = max_pixels  # validated by the setter
        self.pad_token_id = self._pad_token_id()

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        device=None,
        dtype=None,
        quantize=None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_pixels: int | None = None,
        batch_size: int = 8,
    ) -> HFAnswerer:
        """Load a Qwen2.5-VL checkpoint (``hf:`` hub id or ``save_pretrained`` directory).

        Args:
            max_pixels: the most pixels an image is resized to (at most ``max_pixels / 784`` tokens); the
                checkpoint's own limit applies when it is smaller. None: the checkpoint's limit.
            min_pixels: the fewest (small images are enlarged); default: the checkpoint's.
            batch_size: (image, question) pairs per ``generate`` call in :meth:`answer`.
        """
        transformers = require_transformers()
        where, local_only = locate(source)
        mtype = read_config(where, local_only).get("model_type")
        if mtype != "qwen2_5_vl":
            raise ValueError(f"{source}: an Answerer needs a Qwen2.5-VL model (qwen2_5_vl), not {mtype!r}")
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
        m = load_with_processor(source, model_cls, load_vqa_processor, device=device, dtype=dtype, quantize=quantize)
        sizes = {"max_pixels": max_pixels, "min_pixels": min_pixels, "batch_size": batch_size}
        return cls(m.model, m.processor, m.name, m.device, **sizes)

    # -- image size ---------------------------------------------------------------------------------------

    @property
    def max_pixels(self) -> int:
        """The most pixels an image is resized to before it becomes tokens (28x28 pixels a token)."""
        return self._max_pixels

    @max_pixels.setter
    def max_pixels(self, value: int | None) -> None:
        limit = self._processor_max
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < self.factor**2:
                raise ValueError(f"max_pixels must be an integer of at least {self.factor**2}, got {value!r}")
            limit = min(value, limit) if limit else value
        self._max_pixels = int(limit or DEFAULT_MAX_PIXELS)
        low = self._min_pixels if self._min_pixels is not None else self._processor_min or self.factor**2
        self._min = min(int(low), self._max_pixels)

    @property
    def min_pixels(self) -> int:
        return self._min

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of this (patch size x merge size: 28 for Qwen2.5-VL)."""
        ip = self.image_processor
        return int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))

    def _pad_token_id(self) -> int | None:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, getattr(self.model.generation_config, "pad_token_id", None)):
            if candidate is not None:
                return int(candidate)
        eos = self.model.generation_config.eos_token_id
        return int(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else None

    # -- inputs -------------------------------------------------------------------------------------------

    def prepare(self, chats: Sequence[Sequence[Mapping[str, Any]]]):
        """Processor output (left-padded, on the model's device) for conversations from :meth:`conversations`.

        Control tokens that user text contains (``<|im_end|>``, ``<|image_pad|>``...) are encoded as plain text
        (``sanitize_control_tokens``), so a question cannot open a new turn or fake an image. Where transformers
        cannot do that (before 5.x), such text is refused instead.
        """
        kw = {
            "padding": True,
            "padding_side": "left",
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
        }
        chats = [list(c) for c in chats]
        if _can_sanitize(self.processor):
            inputs = self.processor.apply_chat_template(
                chats,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
                processor_kwargs=kw,
            )
        else:
            for chat in chats:
                _refuse_control_tokens(chat, self.tokenizer)
            prompts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
            images = [im for c in chats for im in chat_images(c)]
            inputs = self.processor(text=prompts, images=images or None, return_tensors="pt", **kw)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def conversations(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        questions: str | Sequence[str] | None = None,
        *,
        system: str | None = None,
        messages: Any = None,
    ) -> list[list[dict[str, Any]]]:
        """The conversations ``answer`` would run, in the chat template's format (see :func:`convert_messages`)."""
        if messages is not None:
            if images is not None or questions is not None:
                raise ValueError("give either messages= or images and questions, not both")
            batch = messages if _is_conversation_batch(messages) else [messages]
            return [convert_messages(m, system) for m in batch]
        if questions is None:
            raise ValueError("no question given")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string, got {type(system).__name__}")
        if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)):
            image_list: list[Any] = [images]
        elif images is None:
            image_list = [None]
        else:
            image_list = list(images)
            if not image_list:
                raise ValueError("no images given")
        question_list = [questions] if isinstance(questions, str) else list(questions)
        if not question_list:
            raise ValueError("no questions given")
        if len(question_list) == 1:
            question_list = question_list * len(image_list)
        elif len(image_list) == 1:
            image_list = image_list * len(question_list)
        if len(image_list) != len(question_list):
            raise ValueError(
                f"{len(image_list)} images and {len(question_list)} questions: give one question for all the "
                "images, one image for all the questions, or as many of each"
            )
        return [_single_chat(im, q, system) for im, q in zip(image_list, question_list)]

    # -- answering ----------------------------------------------------------------------------------------

    def _generate_kwargs(self, opts: GenerationOptions) -> dict[str, Any]:
        kw = _generate_kwargs(opts)
        if self.pad_token_id is not None:
            kw["pad_token_id"] = self.pad_token_id
        return kw

    @torch.inference_mode()
    def generate_ids(self, inputs, opts: GenerationOptions) -> torch.Tensor:
        """The new token ids for prepared inputs (the prompt cut off; padding after an early end stays)."""
        with seeded(opts.seed, self.device):
            out = self.model.generate(**inputs, **self._generate_kwargs(opts))
        return out[:, inputs["input_ids"].shape[1] :]

    def answer(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        questions: str | Sequence[str] | None = None,
        *,
        system: str | None = None,
        messages: Any = None,
        **options: Any,
    ) -> list[str]:
        """One answer per (image, question) pair, in order.

        Args:
            images: an image (PIL, path or array) or a list; None for text-only questions.
            questions: a question, or one per image (one question is asked of every image; one image with
                several questions is asked each).
            system: a system prompt for every conversation.
            messages: instead of images and questions: one conversation (a list of messages) or a list of
                them, in the OpenAI-like format of the module doc; one answer each.
            **options: :class:`~mmfusion.interfaces.GenerationOptions` fields.
        """
        opts = generation_options(options, self.default_max_new_tokens)
        convs = self.conversations(images, questions, system=system, messages=messages)
        answers: list[str] = []
        for i in range(0, len(convs), self.batch_size):
            inputs = self.prepare(convs[i : i + self.batch_size])
            new = self.generate_ids(inputs, opts)
            answers += self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return answers

    def stream_answer(
        self,
        image: ImageInput | None = None,
        question: str | None = None,
        *,
        system: str | None = None,
        messages: Any = None,
        **options: Any,
    ) -> Iterator[str]:
        """The answer to one question, piece by piece as it is generated; ``"".join`` of the pieces equals
        ``answer(...)[0]`` for the same arguments. See "Streaming" in the module doc for threads and stopping.
        """
        opts = generation_options(options, self.default_max_new_tokens)
        if messages is not None and _is_conversation_batch(messages):
            raise ValueError("stream_answer takes one conversation; answer() takes several")
        if image is not None and not isinstance(image, (Image.Image, str, os.PathLike, np.ndarray)):
            raise ValueError(f"stream_answer takes one image (a PIL image, path or array), got {type(image).__name__}")
        if question is not None and not isinstance(question, str):
            raise ValueError("stream_answer takes one question (a string)")
        convs = self.conversations(image, question, system=system, messages=messages)
        inputs = self.prepare(convs)
        if opts.num_beams > 1:  # streamers do not follow beam search: one piece when done
            return _pieces([self._decode_one(self.generate_ids(inputs, opts))])
        return self._stream(inputs, opts)

    def _decode_one(self, new_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(new_ids[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _stream(self, inputs, opts: GenerationOptions) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        stop = threading.Event()
        errors: list[BaseException] = []
        kw = self._generate_kwargs(opts)

        def run() -> None:
            try:
                with torch.inference_mode(), seeded(opts.seed, self.device):
                    self.model.generate(
                        **inputs, **kw, streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopFlag(stop)])
                    )
            except BaseException as e:  # handed to the caller's thread
                errors.append(e)
                streamer.text_queue.put(streamer.stop_signal)  # end the consumer's loop

        thread = threading.Thread(target=run, name=f"mmfusion-stream-answer-{id(streamer):x}", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:  # normal end, early exit (GeneratorExit) or an error in the consumer alike
            stop.set()
            thread.join()
        if errors:
            raise errors[0]


def _pieces(pieces: list[str]) -> Iterator[str]:
    yield from (p for p in pieces if p)


def _size_value(size: Any, *keys: str) -> int | None:
    for key in keys:
        value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
        if value:
            return int(value)
    return None
