"""A tiny native CLIP and a small ShapesWorld index, shared by the service tests; a real uvicorn server."""

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.utils import tiny_clip

LOCAL = "http://127.0.0.1"  # the test clients' base URL: a Host the service answers to (it refuses others)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(model dir, index dir, {id: colour-shape name}) for 24 ShapesWorld images."""
    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.index import Index

    root = tmp_path_factory.mktemp("serve")
    model = tiny_clip(root / "clip")
    world = ShapesWorld()
    photos = root / "photos"
    photos.mkdir()
    for i in range(24):
        world.sample("test", i).image.save(photos / f"scene{i:02d}.png")
    with Index.open(root / "db", model=model, write=True) as ix:
        ix.update([photos], progress=False)
    return model, root / "db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ---- a browser for the web page's tests (test_browser*.py) ------------------------------------------------

CHROMIUM = os.environ.get("MMFUSION_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts" / "browser"
TIMEOUT_MS = 10_000


def _chromium() -> str:
    """The system's Chromium; installed with apt-get when missing and we may (never a Playwright download)."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                pytest.skip(f"Chromium is missing and `{' '.join(cmd)}` took over 15 minutes")
            if done.returncode:
                pytest.skip(f"Chromium is missing and `{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}")
        if Path(CHROMIUM).exists():
            return CHROMIUM
    pytest.skip(f"no Chromium at {CHROMIUM}: install it (apt-get install chromium) or set MMFUSION_CHROMIUM")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]' (it is in the dev extra)")
    path = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser, request):
    size = getattr(request, "param", (1280, 900))
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)
