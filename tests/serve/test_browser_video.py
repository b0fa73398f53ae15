"""A video result in a real browser: the card shows the matched frame and its time range, and opening it plays the
video from the segment's start. Reuses test_browser.py's browser, page, embedder and helpers; the screenshot goes
to runs/test-artifacts/browser/."""

from __future__ import annotations

import contextlib
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("av")

from mmfusion.data.video_gallery import export_video_gallery, read_gallery  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import run_server, shot  # noqa: E402
from tests.serve.test_browser import (  # noqa: E402, F401  (browser and page are fixtures used here)
    NAMES,
    ColourEmbedder,
    search,
    thumbs_loaded,
)


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    """(url, ground truth) of a service over 3 ShapesWorld videos of one-object scenes, each of its own colour."""
    from mmfusion.index import Index

    root = tmp_path_factory.mktemp("browser-video")
    export_video_gallery(root / "gallery", n_videos=3, seed=7, max_distractors=0)
    with Index.open(root / "db", model=ColourEmbedder(), write=True) as ix:
        ix.update([root / "gallery"], progress=False)
    app = create_app(ServeSettings(db=str(root / "db"), labels=NAMES), embedder=ColourEmbedder())
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(run_server(app)), read_gallery(root / "gallery")


def test_a_video_result_plays_from_its_segment(page, video_server):  # noqa: F811  (page: the imported fixture)
    url, truth = video_server
    video = truth["videos"][0]
    scene = video["scenes"][-1]  # the last scene: a start well into the video, so seeking is visible
    colour = scene["objects"][0]["colour"]
    page.goto(url)
    cards = search(page, colour)
    first = page.locator("#grid .card").first
    assert cards[0]["name"] == os.path.basename(video["file"])
    assert "video" in first.get_attribute("class")
    assert float(first.get_attribute("data-start")) == pytest.approx(scene["start"], abs=1e-3)
    badge = first.locator(".time-badge").inner_text()
    start_s, end_s = round(scene["start"]), round(scene["end"])
    assert f"{start_s // 60:02d}:{start_s % 60:02d}" in badge and f"{end_s // 60:02d}:{end_s % 60:02d}" in badge
    thumbs_loaded(page, 1)  # the matched frame's thumbnail
    first.locator(".card-open").click()
    page.wait_for_function("document.getElementById('panel').open")
    assert page.is_visible("#panel-video") and page.is_hidden("#panel-img")
    try:
        page.wait_for_function(
            """start => { const v = document.getElementById('panel-video');
                return v.readyState >= 2 && v.currentTime >= start - 0.05 && !v.seeking; }""",
            arg=scene["start"],
        )
    except Exception as e:
        error = page.evaluate("document.getElementById('panel-video').error?.message || ''")
        pytest.fail(f"the video did not play from {scene['start']}s ({error or e})")
    state = page.evaluate(
        """() => { const v = document.getElementById('panel-video');
            return {t: v.currentTime, paused: v.paused, played: v.played.length ? v.played.start(0) : null}; }"""
    )
    assert state["t"] >= scene["start"] - 0.05 and state["t"] <= video["duration"]
    assert not state["paused"] or state["t"] >= video["duration"] - 0.2  # playing (or played to the end from there)
    if state["played"] is not None:
        assert state["played"] >= scene["start"] - 0.05  # it never played the part before the segment
    assert f"plays from {start_s // 60:02d}:{start_s % 60:02d}" in page.inner_text("#panel-meta")
    shot(page, "video-result-playing")
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('panel-video').paused")  # closing the panel stops it
