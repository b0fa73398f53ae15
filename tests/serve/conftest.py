"""A tiny native CLIP and a small ShapesWorld index, shared by the service tests; a real uvicorn server."""

import contextlib
import socket
import threading
import time

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
