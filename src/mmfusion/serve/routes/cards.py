"""Model cards: ``GET /models`` (what each served model is, how it was trained, what it measured) and
``GET /models/{role}/curve.png`` (its training curve). Models are named by role, never by a path from the request;
the cards are read from the runs the service loaded (:mod:`mmfusion.eval.card`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from ...eval.card import card_curve, model_card
from ..deps import ApiKey, ServiceDep
from ..schemas import ModelCards

router = APIRouter(tags=["models"])
ROLES = ("embedder", "captioner", "answerer")


async def _sources(svc) -> dict[str, str | None]:
    """Where each served model was loaded from: the settings, or for the embedder the model the index recorded."""
    s = svc.settings
    embedder = s.model
    if embedder is None and svc.index is not None and svc.embedder is not None:
        stored = await svc.in_index_thread(lambda: svc.index.store.meta("model"))
        embedder = (stored or {}).get("ref")
    return {"embedder": embedder, "captioner": s.captioner, "answerer": s.answerer}


@router.get("/models", response_model=ModelCards)
async def cards(svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """A card for each served model: family, size, training (steps, time, final loss) and the headline figures
    of its evaluation reports (R@K, zero-shot top-1, attribute accuracy and CIDEr, VQA accuracy)."""
    sources = await _sources(svc)
    served = {"embedder": svc.embedder, "captioner": svc.generators.captioner, "answerer": svc.generators.answerer}
    out = []
    for role in ROLES:
        if served[role] is None:
            continue
        card = await asyncio.to_thread(model_card, sources[role], role)
        if card is not None:
            card["id"] = svc.model_name(served[role])
            out.append(card)
    return {"models": out}


@router.get("/models/{role}/curve.png")
async def curve(role: str, svc: ServiceDep, key: ApiKey) -> FileResponse:
    """The training curve of the model serving ``role`` (embedder, captioner or answerer)."""
    if role not in ROLES:
        raise HTTPException(404, f"no role {role!r}: use one of {', '.join(ROLES)}")
    path = await asyncio.to_thread(card_curve, (await _sources(svc))[role])
    if path is None:
        raise HTTPException(404, f"the {role} has no training curve (it was not trained by mmfusion here)")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})
