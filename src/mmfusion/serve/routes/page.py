"""The web page: ``GET /`` and its files under ``/static`` (search, search by example, more like this, ask,
caption, labels)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The web page: search, search by example, more like this, ask, caption, labels."""
    index_html = STATIC / "index.html"
    if not index_html.is_file():
        raise HTTPException(404, "the web page is not installed")
    return FileResponse(index_html, media_type="text/html", headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """The page's files at /static (a mount: routers cannot carry one)."""
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
