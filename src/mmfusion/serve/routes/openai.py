"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/embeddings`` and ``POST /v1/chat/completions``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from ..budgets import check_chars, check_count
from ..chat import ChatCompletion, ChatRequest, complete
from ..deps import ApiKey, ServiceDep, need_embedder
from ..schemas import EmbeddingRequest, EmbeddingsResponse, ModelList

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def models(svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """The served models, each with its role (embedder, captioner, answerer)."""
    gen = svc.generators
    roles = (("embedder", svc.embedder), ("captioner", gen.captioner), ("answerer", gen.answerer))
    data = [{"id": svc.model_name(m), "object": "model", "created": int(svc.started), "owned_by": "mmfusion",
             "role": role} for role, m in roles if m is not None]  # fmt: skip
    return {"object": "list", "data": data}


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(req: EmbeddingRequest, svc: ServiceDep, key: ApiKey) -> JSONResponse:
    """Embeddings of texts, or of images sent as data URLs with ``"modality": "image"``."""
    embedder = need_embedder(svc)
    s, model_id = svc.settings, svc.embedder_id
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if not inputs:
        raise HTTPException(400, "input is empty: give a text or a list of texts")
    check_count("inputs", len(inputs), s, "max_inputs")
    if req.modality == "text":
        check_chars(inputs, s)
    if req.model and req.model != model_id:
        raise HTTPException(404, f"model {req.model!r} is not served here; this service runs {model_id!r}")
    if req.dimensions is not None and req.dimensions != embedder.embed_dim:
        raise HTTPException(400, f"dimensions: this model gives {embedder.embed_dim}-d embeddings only")
    if req.modality == "image":
        vecs = await svc.embed_images(await svc.decode(inputs))
        tokens = 0
    else:
        vecs = await svc.embed_texts(inputs)
        tokens = sum(len(t.split()) for t in inputs)
    data = []
    for i, v in enumerate(vecs):
        emb: Any = (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                    if req.encoding_format == "base64" else np.asarray(v, dtype=np.float32).tolist())  # fmt: skip
        data.append({"object": "embedding", "index": i, "embedding": emb})
    # rendered as it is: validating the returned dict against the model would walk every float again (50 us a
    # vector); the response model documents the shape
    return JSONResponse({"object": "list", "data": data, "model": model_id,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(req: ChatRequest, svc: ServiceDep, key: ApiKey) -> Any:
    """Answer a question about images, or caption them (OpenAI's chat completions, streaming or not)."""
    return await complete(svc, req)
