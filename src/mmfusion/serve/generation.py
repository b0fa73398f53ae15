"""Captions and answers for the service: one generation at a time, off the event loop, streamed or not.

Chat completions and jobs both come here. A model generates for one request at a time (a semaphore): generation
is long and memory-hungry, and two at once on the same cores only make both slower. Waiting requests queue on
the semaphore; the concurrency limit of the app bounds how many can wait.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import HTTPException
from PIL import Image

from ..interfaces import GenerationOptionError, GenerationOptions

_END = object()
Role = Literal["captioner", "answerer"]
log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """What one generation is asked: the images, the question (None: caption), and the whole conversation."""

    images: list[Image.Image]
    question: str | None
    messages: list[dict[str, Any]] | None = None  # the chat template's format, images as PIL (answerers only)


def options_from(
    max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None, cap: int
) -> GenerationOptions:
    """OpenAI's sampling fields as :class:`GenerationOptions`: greedy unless a temperature above 0 is given."""
    if max_tokens is not None and max_tokens > cap:
        raise HTTPException(400, f"max_tokens {max_tokens} is over this service's limit of {cap}; ask for fewer")
    opts: dict[str, Any] = {"max_new_tokens": max_tokens or cap}
    if temperature:
        opts.update(do_sample=True, temperature=float(temperature))
    if top_p is not None:
        opts["top_p"] = float(top_p)
    if seed is not None:
        opts["seed"] = seed
    try:
        return GenerationOptions.parse(opts)
    except GenerationOptionError as e:
        raise HTTPException(400, str(e)) from e


def _option_kwargs(opts: GenerationOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "seed")}


class Generators:
    """The served Captioner and Answerer, their thread and their one-at-a-time lock."""

    def __init__(self, captioner=None, answerer=None):
        check_roles(captioner, answerer)
        self.captioner, self.answerer = captioner, answerer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mmfusion-generate")
        self._lock: asyncio.Semaphore | None = None
        self.answerer_takes_messages = answerer is not None and "messages" in _params(answerer.answer)
        self.streams = answerer is not None and hasattr(answerer, "stream_answer")

    @property
    def lock(self) -> asyncio.Semaphore:
        if self._lock is None:  # made on the serving loop
            self._lock = asyncio.Semaphore(1)
        return self._lock

    def role_for(self, prompt: Prompt, model: str | None, names: dict[str, str | None]) -> Role:
        """The role a chat request goes to: the model it names, else the answerer for questions and the
        captioner for an image alone. (A role, not a model: one model may play both.)"""
        if model:
            asked = prompt.question is not None or prompt.messages is not None
            # one model may serve both roles (a generative VQA run): a question goes to it as the answerer
            if model == names.get("answerer") and (asked or model != names.get("captioner")):
                if not asked:
                    raise HTTPException(400, "ask a question: add a text part to the user message")
                return "answerer"
            if model == names.get("captioner"):
                if len(prompt.images) < 1:
                    raise HTTPException(400, "captioning needs an image: add an image_url part")
                return "captioner"
            if model == names.get("embedder"):
                raise HTTPException(400, f"{model!r} is an embedding model: use /v1/embeddings")
            served = ", ".join(repr(n) for n in (names.get("answerer"), names.get("captioner")) if n) or "none"
            raise HTTPException(404, f"model {model!r} is not served here; chat models: {served}")
        if prompt.question is not None:
            if self.answerer is None:
                raise HTTPException(400, "no answerer is loaded: start the service with --answerer to ask questions")
            return "answerer"
        if self.captioner is not None and prompt.images:
            return "captioner"
        if self.answerer is not None and prompt.images:
            raise HTTPException(400, "no captioner is loaded (--captioner); send a question for the answerer")
        raise HTTPException(400, "nothing to do: send an image to caption, or an image and a question")

    def _run(self, role: Role, prompt: Prompt, opts: GenerationOptions) -> str:
        kw = _option_kwargs(opts)
        if role == "captioner":
            captions = self.captioner.caption(prompt.images, **kw)
            return captions[0] if len(captions) == 1 else "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
        if prompt.messages is not None and self.answerer_takes_messages:
            return self.answerer.answer(messages=prompt.messages, **kw)[0]
        return self.answerer.answer(_one_image(prompt), prompt.question, **kw)[0]

    async def generate(self, role: Role, prompt: Prompt, opts: GenerationOptions) -> str:
        """The caption (``role="captioner"``) or the answer (``"answerer"``), whole."""
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(self.pool, _guard, self._run, role, prompt, opts)

    async def stream(self, role: Role, prompt: Prompt, opts: GenerationOptions) -> AsyncIterator[str]:
        """Pieces of the caption or answer as they come (a captioner yields its caption whole)."""
        if role == "captioner" or not self.streams:
            yield await self.generate(role, prompt, opts)
            return
        loop = asyncio.get_running_loop()
        kw = _option_kwargs(opts)
        async with self.lock:
            if prompt.messages is not None and self.answerer_takes_messages:
                start = lambda: self.answerer.stream_answer(messages=prompt.messages, **kw)
            else:
                start = lambda: self.answerer.stream_answer(_one_image(prompt), prompt.question, **kw)
            pieces = await loop.run_in_executor(self.pool, _guard, start)
            try:
                while (piece := await loop.run_in_executor(self.pool, _guard, next, pieces, _END)) is not _END:
                    yield piece
            finally:  # the client went away or the stream ended: stop generating and join its thread
                close = getattr(pieces, "close", None)
                if close is not None:
                    await loop.run_in_executor(self.pool, close)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _one_image(prompt: Prompt) -> Image.Image:
    """The one image an answerer without a chat template (mmfusion's own VQA models) is asked about."""
    if len(prompt.images) != 1:
        raise HTTPException(400, f"this answerer takes one image per question and got {len(prompt.images)}; "
                                 "send one image_url part with the question")  # fmt: skip
    return prompt.images[0]


def check_roles(captioner, answerer) -> None:
    """Refuse, at start-up, a model that cannot play the role it was given, naming what can (an answerer needs
    ``answer``; ``stream_answer`` is optional here: without it the answer streams whole)."""
    if captioner is not None and not callable(getattr(captioner, "caption", None)):
        raise ValueError(f"--captioner {_describe(captioner)} does not caption; give a captioner run (mmfusion "
                         "train caption) or a BLIP such as hf:Salesforce/blip-image-captioning-base")  # fmt: skip
    if answerer is None:
        return
    if not callable(getattr(answerer, "answer", None)) or not getattr(answerer, "answers_questions", True):
        raise ValueError(f"--answerer {_describe(answerer)} does not answer questions; give a VQA run (mmfusion "
                         "train vqa, or mmfusion train vqa --preset caption-tiny) or an hf: model such as "
                         "hf:Qwen/Qwen2.5-VL-3B-Instruct")  # fmt: skip


def model_label(model) -> str:
    """A model's name as the service shows it: its ``name``, else its class."""
    return getattr(model, "name", None) or type(model).__name__


def _describe(model) -> str:
    kind = getattr(model, "family", None) or getattr(model, "model_type", None) or type(model).__name__
    return f"({model_label(model)!r}, a {kind} model)"


def _guard(fn, *args):
    """Run a model call; its bad-input errors become 400s naming the problem."""
    try:
        return fn(*args)
    except GenerationOptionError as e:
        raise HTTPException(400, str(e)) from e
    except (ValueError, TypeError) as e:  # the model's own words may hold paths or internals: they go to the log
        log.warning("the model refused a request: %s: %s", type(e).__name__, e)
        raise HTTPException(400, f"the model could not handle this request ({type(e).__name__}); "
                                 "the server's log says why") from e  # fmt: skip


def _params(fn) -> Sequence[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def count_tokens(model, text: str) -> int:
    """Tokens of ``text`` by the model's tokenizer when it has one, else words."""
    tok = getattr(model, "tokenizer", None)
    try:
        if callable(getattr(tok, "ids", None)):  # mmfusion's own tokenizer: encode() pads to the context length
            return len(tok.ids(text))
        if tok is not None and hasattr(tok, "encode"):
            ids = tok.encode(text, add_special_tokens=False) if _takes(tok.encode, "add_special_tokens") else None
            if ids is None:
                ids = tok.encode(text)
            return len(getattr(ids, "ids", ids))
    except Exception:  # a tokenizer without a plain encode: fall back to words
        pass
    return len(text.split())


def _takes(fn, name: str) -> bool:
    params = _params(fn)
    return name in params or "kwargs" in params
