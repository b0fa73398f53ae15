"""``POST /v1/chat/completions``: questions about images and captions, in OpenAI's shape (streaming or not).

Images are ``image_url`` content parts holding a data URL (``data:image/png;base64,...``), an indexed image's id
(``mmfusion://images/42``) or, only when the service allows URL fetching, a public http(s) URL. The request names
the answerer or the captioner as its ``model``; without one, a question goes to the answerer and an image alone
to the captioner. ``stream: true`` answers with server-sent events ending in ``data: [DONE]``.

The models are Hugging Face ones (BLIP, Qwen2.5-VL) or mmfusion's own runs, alike. mmfusion's own answerers (a
generative VQA run, a VQA classifier) read the last user text about its one image, without system messages or
earlier turns; a VQA classifier picks an answer from its vocabulary, so the sampling fields and max_tokens do not
change it (they are checked, then ignored, as clients send them by default) and it always finishes with ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field

from .budgets import check_chars
from .generation import Prompt, count_tokens, options_from
from .images import (
    check_image_ref,
    decode_data_url,
    decode_image_bytes,
    fetch_url,
    image_url_of,
    indexed_frame,
    indexed_id,
    video_frame_image,
)
from .schemas import Body

MAX_IMAGES = 16
MAX_PARTS = 1024  # content parts in all messages of one request
log = logging.getLogger(__name__)


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = Field(
        None,
        description="a text, or parts: {'type': 'text', 'text': ...} and {'type': 'image_url', 'image_url': "
        "{'url': 'data:image/png;base64,...' | 'mmfusion://images/<id>' | 'mmfusion://videos/<id>?t=<seconds>'}}",
    )


class StreamOptions(Body):
    include_usage: bool = Field(False, description="end the stream with a chunk holding the token counts")


class ChatRequest(Body):
    """OpenAI's chat completion request. Unlisted OpenAI fields are accepted and ignored."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_PARTS)
    model: str | None = Field(None, description="the answerer's or the captioner's id (see /v1/models)")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="the most new tokens (default and most: the server's --max-new-tokens; more is refused with 400)",
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (newer name)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy (deterministic)")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, description="makes sampling repeatable")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = Field(None, description="not supported: leave it out")


async def resolve_image(svc, url: str) -> Image.Image:
    """An ``image_url`` to a PIL image: a data URL, an indexed id, or (when enabled) a public URL."""
    s = svc.settings
    loop = asyncio.get_running_loop()
    frame = indexed_frame(url)
    image_id = frame[0] if frame else indexed_id(url)
    if image_id is not None:
        from ..index.store import is_video_format

        if svc.index is None:
            raise HTTPException(404, "no index is served, so mmfusion:// ids name nothing; send a data URL")
        rows = await svc.in_index_thread(svc.index.store.get, [image_id])
        if image_id not in rows:
            raise HTTPException(404, f"no indexed image or video has id {image_id}")
        row = rows[image_id]
        if is_video_format(row.format):
            if frame is None:
                raise HTTPException(400, f"{image_id} is a video: name one of its frames as "
                                         f"mmfusion://videos/{image_id}?t=SECONDS")  # fmt: skip
            return await loop.run_in_executor(None, video_frame_image, row.path, frame[1], s.max_pixels, True)
        if frame is not None:
            raise HTTPException(400, f"{image_id} is an image, not a video: name it as mmfusion://images/{image_id}")
        return await loop.run_in_executor(None, _decode_indexed, row.path, s.max_pixels)
    check_image_ref(url, s.allow_url_fetch, "chat")
    if url.startswith(("http://", "https://")):
        data = await loop.run_in_executor(None, fetch_url, url, s.max_body_bytes)
        return await loop.run_in_executor(None, decode_image_bytes, data, s.max_pixels)
    return await loop.run_in_executor(None, decode_data_url, url, s.max_pixels)


def _decode_indexed(path: str, max_pixels: int) -> Image.Image:
    from ..data.images import ImageDecodeError
    from ..index.decode import decode_file

    try:
        return decode_file(path, None, max_pixels).pixels
    except ImageDecodeError as e:
        raise HTTPException(410, f"the indexed image cannot be read any more ({e}); re-run mmfusion index") from e


async def build_prompt(svc, messages: list[ChatMessage]) -> Prompt:
    """The OpenAI messages as a :class:`Prompt`: images resolved, the last user text as the question."""
    chat: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    contents = [[] if m.content is None else [{"type": "text", "text": m.content}] if isinstance(m.content, str)
                else m.content for m in messages]  # fmt: skip
    if sum(map(len, contents)) > MAX_PARTS:
        raise HTTPException(413, f"more than {MAX_PARTS} content parts in one request")
    check_chars((p.get("text") if isinstance(p.get("text"), str) else None for c in contents for p in c),
                svc.settings)  # fmt: skip
    for i, (msg, parts) in enumerate(zip(messages, contents, strict=True)):
        out: list[dict[str, Any]] = []
        for part in parts:
            kind = part.get("type", "text")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise HTTPException(400, f"messages[{i}]: a text part needs 'text' (a string)")
                out.append({"type": "text", "text": text})
            elif kind == "image_url":
                if len(images) >= MAX_IMAGES:
                    raise HTTPException(413, f"more than {MAX_IMAGES} images in one request")
                img = await resolve_image(svc, image_url_of(part))
                images.append(img)
                out.append({"type": "image", "image": img})
            else:
                raise HTTPException(400, f"messages[{i}]: content type {kind!r} is not supported (text, image_url)")
        chat.append({"role": msg.role, "content": out})
    if chat[-1]["role"] != "user":
        raise HTTPException(400, "the last message must be the user's: there is nothing to answer")
    question = " ".join(p["text"] for p in chat[-1]["content"] if p["type"] == "text").strip() or None
    multi_turn = len(chat) > 1 or any(p["type"] == "image" for m in chat[:-1] for p in m["content"])
    return Prompt(images=images, question=question, messages=chat if (multi_turn or question) else None)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"] = Field(description="length: it reached max_tokens")


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's chat completion (with ``stream: true``, server-sent ``chat.completion.chunk`` events instead)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


async def complete(svc, req: ChatRequest) -> dict[str, Any] | StreamingResponse:
    """The answer (or caption) for a chat request: a whole completion, or a stream of server-sent events."""
    gen = svc.generators
    if gen.captioner is None and gen.answerer is None:
        raise HTTPException(503, "no captioner or answerer is loaded: serve with --answerer or --captioner")
    if req.stop:
        raise HTTPException(400, "stop sequences are not supported; leave 'stop' out")
    if req.stream_options is not None and not req.stream:
        raise HTTPException(400, "stream_options is only allowed with stream: true")
    prompt = await build_prompt(svc, req.messages)
    names = {"captioner": svc.model_name(gen.captioner), "answerer": svc.model_name(gen.answerer),
             "embedder": svc.model_name(svc.embedder)}  # fmt: skip
    role = gen.role_for(prompt, req.model, names)
    model = getattr(gen, role)
    if role == "captioner" and prompt.messages is not None:
        prompt.messages = None  # a captioner describes the images; text parts are not used
    opts = options_from(req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p, req.seed,
                        svc.settings.max_new_tokens)  # fmt: skip
    name = svc.model_name(model)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    prompt_tokens = count_tokens(model, prompt.question or "")
    if not req.stream:
        text = await gen.generate(role, prompt, opts)
        done = count_tokens(model, text)
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish(model, done, opts)}],
            "usage": _usage(prompt_tokens, done),
        }  # fmt: skip

    usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        if usage:  # OpenAI's shape: null on every chunk but the last, which has no choices
            body["usage"] = None
        return _event(body)

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        pieces: list[str] = []
        try:
            async for piece in gen.stream(role, prompt, opts):
                pieces.append(piece)
                yield chunk({"content": piece})
        except HTTPException as e:  # headers are sent: the error travels in the stream, as OpenAI's does
            yield _error_event(str(e.detail), "invalid_request_error")
        except Exception:
            log.exception("streamed generation failed")
            yield _error_event("generation failed (the server's log says why)", "server_error")
        else:
            done = count_tokens(model, "".join(pieces))
            yield chunk({}, _finish(model, done, opts))
            if usage:
                yield _event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                              "choices": [], "usage": _usage(prompt_tokens, done)})  # fmt: skip
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


def _finish(model, completion_tokens: int, opts) -> str:
    """``length`` when the text used up max_tokens; a classifier's answer is chosen whole, so always ``stop``."""
    if getattr(model, "answer_vocabulary", None) is not None:
        return "stop"
    return "length" if completion_tokens >= opts.max_new_tokens else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _error_event(message: str, kind: str) -> str:
    return _event({"error": {"message": message, "type": kind}})
