"""Zero-shot labels: ``POST /classify`` scores an image against labels with prompt ensembles (CLIP's recipe)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException

from ..budgets import check_chars, check_count
from ..deps import ApiKey, ServiceDep, need_embedder, need_index
from ..schemas import ClassifyRequest, ClassifyResponse

router = APIRouter(tags=["labels"])


@router.post("/classify", response_model=ClassifyResponse)
async def classify(req: ClassifyRequest, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """Zero-shot labels for an image (a data URL or an indexed id), with prompt ensembles."""
    from ...data.prompts import PHOTO_TEMPLATES, read_templates
    from ...tasks.labels import ZeroShotClassifier, is_sigmoid, probabilities_np

    emb = need_embedder(svc)
    if (req.image is None) == (req.id is None):
        raise HTTPException(400, "give exactly one of image (a data URL) or id")
    s = svc.settings
    n_templates = len(req.templates) if req.templates else len(PHOTO_TEMPLATES)
    check_count("prompts (labels x templates)", len(req.labels) * n_templates, s, "max_prompts")
    try:
        templates = read_templates(req.templates) if req.templates else None
        clf = ZeroShotClassifier(emb, req.labels, templates, cache_dir=None)
    except ValueError as e:
        raise HTTPException(400, str(e)) from e
    labels, n_templates = clf.labels, len(clf.templates)
    # label embeddings: every prompt of every label through the batched, cached text path
    texts = [t.replace("{}", lab) for lab in labels for t in clf.templates]
    check_chars(texts, s)
    vecs = np.stack(await svc.embed_texts(texts)).astype(np.float32).reshape(len(labels), n_templates, -1)
    label_emb = _normalize(_normalize(vecs).mean(1))  # (labels, D)
    if req.image is not None:
        img = (await svc.embed_images(await svc.decode([req.image])))[0]
    else:
        ix = need_index(svc)
        try:
            img = await svc.in_index_thread(ix.vector_of, req.id)
        except KeyError as e:
            raise HTTPException(404, f"no indexed image has id {req.id}") from e
    z = np.asarray(img, dtype=np.float32)[None]  # (1, D)
    sigmoid = is_sigmoid(emb)
    if req.threshold is not None:
        scores = probabilities_np(emb, z, label_emb) if sigmoid else z @ label_emb.T
        pairs = [(lab, float(s)) for lab, s in zip(labels, scores[0].tolist(), strict=True) if s >= req.threshold]
        pairs.sort(key=lambda p: -p[1])
    else:
        p = probabilities_np(emb, z, label_emb)[0]
        top = np.argsort(-p, kind="stable")[: min(req.k, len(labels))]
        pairs = [(labels[j], float(p[j])) for j in top]
    return {"labels": [{"label": lab, "score": round(s, 6)} for lab, s in pairs],
            "score": "sigmoid" if sigmoid else ("cosine" if req.threshold is not None else "softmax")}  # fmt: skip


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
