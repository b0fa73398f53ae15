"""Image and video search: ``POST /search`` (text, image, id or weighted terms), ``POST /search/upload`` (by an
uploaded file), and the indexed files by id only: ``GET /images/{id}``, ``GET /thumbs/{id}``, and for a video
``GET /videos/{id}`` (the file, with HTTP Range so a player seeks) and ``GET /videos/{id}/frame?t=S`` (a frame)."""

from __future__ import annotations

import asyncio
import io
import os
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi import Path as FastPath
from fastapi.responses import FileResponse, Response
from PIL import Image

from ...data.images import ImageDecodeError
from ..budgets import check_chars, check_count
from ..deps import ApiKey, ServiceDep, need_embedder, need_index
from ..images import video_frame_image
from ..schemas import MAX_ID, MAX_K, SearchRequest, SearchResponse, SearchTerm
from ..service import Service
from ..settings import ServeSettings

router = APIRouter(tags=["search"])


@router.post("/search", response_model=SearchResponse)
async def search(req: SearchRequest, svc: ServiceDep, key: ApiKey) -> dict[str, Any]:
    """Images of the index best matching a text, an image, an indexed image's id, or a weighted sum."""
    return await run_search(svc, req)


@router.post("/search/upload", response_model=SearchResponse)
async def search_upload(
    svc: ServiceDep,
    key: ApiKey,
    image: UploadFile = File(description="an image file: search by example"),
    text: str | None = Form(None),
    k: int = Form(20, ge=1, le=MAX_K),
    threshold: float | None = Form(None, allow_inf_nan=False),
) -> dict[str, Any]:
    """Search by an uploaded image (multipart form), optionally plus a text."""
    limit = svc.settings.max_body_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"the upload is over {limit:,} bytes")
    (img,) = await svc.decode([data])
    return await run_search(svc, SearchRequest(text=text or None, k=k, threshold=threshold), img)


PathId = Annotated[int, FastPath(ge=0, le=MAX_ID, description="an indexed image's id")]


@router.get("/images/{image_id}")
async def image_file(image_id: PathId, svc: ServiceDep, key: ApiKey) -> FileResponse:
    """The indexed image with this id (by id only: no path from the request is ever read)."""
    row = await _image_row(svc, image_id)
    if not os.path.isfile(row.path):
        raise HTTPException(410, f"image {image_id} is indexed but its file is gone; re-run mmfusion index")
    media = Image.MIME.get((row.format or "").upper(), "application/octet-stream")
    return FileResponse(row.path, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/thumbs/{image_id}")
async def thumbnail(image_id: PathId, svc: ServiceDep, key: ApiKey) -> Response:
    """A JPEG thumbnail (longest side ``thumb_size``) of the indexed image with this id."""
    row = await _image_row(svc, image_id)
    cached = (image_id, row.hash)
    data = svc.thumbs.get(cached)
    if data is None:
        data = await asyncio.get_running_loop().run_in_executor(None, _make_thumb, row.path, svc.settings)
        svc.thumbs.put(cached, data)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/videos/{video_id}")
async def video_file(video_id: PathId, svc: ServiceDep, key: ApiKey) -> FileResponse:
    """The indexed video with this id (by id only), with HTTP Range support so that a player can seek."""
    row = await _video_row(svc, video_id)
    return FileResponse(row.path, media_type=row.format, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/videos/{video_id}/frame")
async def video_frame(
    video_id: PathId,
    svc: ServiceDep,
    key: ApiKey,
    t: float = Query(0.0, ge=0.0, le=1e7, allow_inf_nan=False, description="seconds into the video"),
    thumb: bool = Query(False, description="a thumbnail (longest side thumb_size) instead of the whole frame"),
) -> Response:
    """A JPEG of the frame the indexed video with this id shows at ``t`` seconds (search results name their
    matched frame). Only thumbnails are cached (small, bounded in bytes by ``thumb_size``); a whole frame is
    decoded each time, and refused (413) when its pixels are over ``max_pixels``, checked before decoding."""
    row = await _video_row(svc, video_id)
    cached = (video_id, row.hash, round(t, 3), "frame")
    data = svc.thumbs.get(cached) if thumb else None
    if data is None:
        img = await asyncio.get_running_loop().run_in_executor(
            None, video_frame_image, row.path, t, svc.settings.max_pixels
        )
        data = _jpeg(img, svc.settings.thumb_size if thumb else None)
        if thumb:
            svc.thumbs.put(cached, data)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def run_search(svc: Service, req: SearchRequest, image: Image.Image | None = None) -> dict[str, Any]:
    """The response to ``req``; ``image``, already decoded (an upload), joins its terms after the text."""
    need_index(svc)
    need_embedder(svc)
    terms = await _terms(svc, req, image)
    rerank = _rerank_text(svc, req) if req.rerank else None
    k = max(req.k, svc.settings.rerank_k) if rerank else req.k
    options = {"k": k, "threshold": req.threshold, "path": req.path, "after": req.after, "before": req.before}
    try:
        results = await svc.search(terms, options)  # batched with concurrent searches
    except KeyError as e:
        asked = [int(t.value) for t in terms if t.kind == "id"]
        rows = await svc.in_index_thread(svc.index.store.get, asked)
        missing = ", ".join(str(i) for i in asked if i not in rows) or "asked for"
        raise HTTPException(404, f"no indexed image has id {missing}") from e
    except ValueError as e:
        raise HTTPException(400, str(e)) from e
    if rerank:
        results = await _reranked(svc, rerank, results, req.k)
    return {"results": [_hit(r) for r in results]}


def _hit(r) -> dict[str, Any]:
    """One search result as the service returns it (a video's URLs name its matched frame and its file)."""
    hit = {"id": r.id, "score": round(r.score, 6), "name": r.path.rsplit("/", 1)[-1], "metadata": r.metadata,
           "image_url": f"/images/{r.id}", "thumbnail_url": f"/thumbs/{r.id}", "media": "image"}  # fmt: skip
    if r.metadata.get("media") == "video":
        m = r.metadata
        frame = f"/videos/{r.id}/frame?t={m['thumb']}"
        hit |= {"media": "video", "start": m["start"], "end": m["end"], "video_url": f"/videos/{r.id}",
                "image_url": frame, "thumbnail_url": frame + "&thumb=true"}  # fmt: skip
    return hit


def _rerank_text(svc: Service, req: SearchRequest) -> str:
    """The words a re-ranker reads for ``req``: its text and its text terms of positive weight."""
    if svc.reranker is None:
        raise HTTPException(
            400,
            "this service has no re-ranker: start it with --reranker RUN (a mmfusion train rerank run, "
            "or a captioner run)",
        )
    texts = ([req.text] if req.text else []) + [t.text for t in req.terms if t.text and t.weight > 0]
    if not texts:
        raise HTTPException(400, "rerank=true reads the query's words: give a text (not only images or ids)")
    return " ".join(texts)


async def _reranked(svc: Service, text: str, results: list, k: int) -> list:
    """The first ``rerank_k`` results re-ordered by the re-ranker (its model work off the event loop and out of the
    index's thread), then the first ``k``."""
    from ...index.rerank import rerank_results

    head = results[: svc.settings.rerank_k]
    rows = await svc.in_index_thread(svc.index.store.get, [r.id for r in head])
    head = await asyncio.to_thread(rerank_results, svc.reranker, rows, text, head)
    return (head + results[len(head) :])[:k]


async def _terms(svc: Service, req: SearchRequest, image: Image.Image | None = None) -> list:
    """The request's query terms: texts and images as vectors (through the batchers), ids as they are."""
    from ...index.query import Term

    items = list(req.terms)
    if req.text or req.image or req.id is not None:
        items.insert(0, SearchTerm(weight=1.0, text=req.text, image=req.image, id=req.id))
    s = svc.settings
    check_count("search terms", len(items) + (image is not None), s, "max_search_terms")
    check_chars([t.text for t in items] + [req.path], s)
    terms = []
    for t in items:
        given = [x for x in (t.text, t.image, t.id) if x is not None and x != ""]
        if len(given) > 1 and t is not items[0]:
            raise HTTPException(400, "each search term is one of text, image or id")
        if t.text:
            terms.append(Term(t.weight, "vector", (await svc.embed_texts([t.text]))[0]))
        if t.image:
            (img,) = await svc.decode([t.image])
            terms.append(Term(t.weight, "vector", (await svc.embed_images([img]))[0]))
        if t.id is not None:
            terms.append(Term(t.weight, "id", int(t.id)))
    if image is not None:
        terms.append(Term(1.0, "vector", (await svc.embed_images([image]))[0]))
    if not terms:
        raise HTTPException(400, "nothing to search for: give text, image (a data URL), id, or terms")
    return terms


async def _video_row(svc: Service, video_id: int):
    from ...index.store import is_video_format

    row = await _row(svc, video_id, "video")
    if not is_video_format(row.format):
        raise HTTPException(404, f"{video_id} is an image, not a video: see /images/{video_id}")
    if not os.path.isfile(row.path):
        raise HTTPException(410, f"video {video_id} is indexed but its file is gone; re-run mmfusion index")
    return row


async def _image_row(svc: Service, image_id: int):
    from ...index.store import is_video_format

    row = await _row(svc, image_id)
    if is_video_format(row.format):
        raise HTTPException(404, f"{image_id} is a video, not an image: see /videos/{image_id} for the file and "
                                 f"/videos/{image_id}/frame?t=SECONDS for a frame")  # fmt: skip
    return row


async def _row(svc: Service, image_id: int, what: str = "image"):
    ix = need_index(svc)
    rows = await svc.in_index_thread(ix.store.get, [image_id])
    if image_id not in rows:
        raise HTTPException(404, f"no indexed {what} has id {image_id}")
    return rows[image_id]


def _make_thumb(path: str, settings: ServeSettings) -> bytes:
    from ...index.decode import decode_file

    try:
        img = decode_file(path, None, settings.max_pixels).pixels  # EXIF orientation applied, any mode to RGB
    except ImageDecodeError as e:
        raise HTTPException(422, f"cannot read the image: {e}") from e
    return _jpeg(img.copy(), settings.thumb_size)


def _jpeg(img: Image.Image, side: int | None) -> bytes:
    """``img`` as JPEG bytes, shrunk to ``side`` on its longest side when given."""
    if side:
        img.thumbnail((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
