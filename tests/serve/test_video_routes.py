"""The service's video search: results carry media, start and end; the video is served by id with HTTP Range (so a
player seeks); the matched frame is served as a JPEG whose colour is the one asked for. ShapesWorld videos with a
known answer, indexed by the colour embedder of test_browser.py, which truly works on ShapesWorld colours."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("av")

from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.data.video_gallery import export_video_gallery, read_gallery  # noqa: E402
from mmfusion.index import Index  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import LOCAL  # noqa: E402
from tests.serve.test_browser import ColourCaptioner, ColourEmbedder, dominant_colour  # noqa: E402


@pytest.fixture(scope="module")
def video_world(tmp_path_factory):
    """(index dir, ground truth, gallery dir, id of a photo) for 4 videos of one-object scenes and a photo."""
    from mmfusion.data.shapes import ShapesWorld

    root = tmp_path_factory.mktemp("videos")
    export_video_gallery(root / "gallery", n_videos=4, seed=5, max_distractors=0)
    ShapesWorld().sample("test", 1).image.save(root / "gallery" / "photo.png")
    with Index.open(root / "db", model=ColourEmbedder(), write=True) as ix:
        report = ix.update([root / "gallery"], progress=False)
        assert report.added == 5 and not report.skipped
        photo = next(r.id for r in ix.search("red green blue yellow purple white orange cyan", k=5)
                     if r.metadata["media"] == "image")  # fmt: skip
    return root / "db", read_gallery(root / "gallery"), root / "gallery", photo


@pytest.fixture(scope="module")
def client(video_world):
    app = create_app(ServeSettings(db=str(video_world[0])), embedder=ColourEmbedder())
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def _scene(truth, name: str, colour: str) -> tuple[float, float]:
    video = next(v for v in truth["videos"] if os.path.basename(v["file"]) == name)
    return next((s["start"], s["end"]) for s in video["scenes"] if s["objects"][0]["colour"] == colour)


def test_search_returns_the_video_at_its_matching_segment(client, video_world):
    _, truth, _, _ = video_world
    colour = truth["videos"][0]["scenes"][1]["objects"][0]["colour"]
    results = client.post("/search", json={"text": colour, "k": 5}).json()["results"]
    top = results[0]
    assert top["media"] == "video" and top["score"] > 0.9
    start, end = _scene(truth, top["name"], colour)
    assert (top["start"], top["end"]) == pytest.approx((start, end), abs=1e-3)
    assert top["video_url"] == f"/videos/{top['id']}" and top["thumbnail_url"].startswith(f"/videos/{top['id']}/frame")
    assert top["metadata"]["segments"][0]["start"] == top["start"]
    photo = next(r for r in results if r["media"] == "image")
    assert photo["start"] is None and photo["video_url"] is None and photo["image_url"] == f"/images/{photo['id']}"


def test_the_matched_frame_shows_the_colour_asked_for(client, video_world):
    _, truth, _, _ = video_world
    for colour in {s["objects"][0]["colour"] for v in truth["videos"] for s in v["scenes"]}:
        top = client.post("/search", json={"text": colour, "k": 1}).json()["results"][0]
        for url in (top["thumbnail_url"], top["image_url"]):
            res = client.get(url)
            assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
            assert dominant_colour(Image.open(io.BytesIO(res.content))) == colour, (colour, url)


def test_health_counts_images_and_videos_apart(client):
    h = client.get("/healthz").json()
    assert (h["images"], h["videos"]) == (1, 4)


def test_the_video_is_served_by_id_with_range_requests(client, video_world):
    _, truth, gallery, photo = video_world
    top = client.post("/search", json={"text": "red", "k": 1}).json()["results"][0]
    data = (gallery / "videos" / top["name"]).read_bytes()
    whole = client.get(top["video_url"])
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(top["video_url"], headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == data[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(data)}"
    tail = client.get(top["video_url"], headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == data[-50:]
    assert client.get(top["video_url"], headers={"Range": f"bytes={len(data) + 10}-"}).status_code == 416


def test_video_routes_name_videos_by_id_only(client, video_world):
    _, _, _, photo = video_world
    assert client.get(f"/videos/{photo}").status_code == 404  # an image is not a video
    assert "not a video" in client.get(f"/videos/{photo}/frame").json()["error"]["message"]
    assert client.get("/videos/987654").status_code == 404
    assert client.get("/videos/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    video = client.post("/search", json={"text": "red", "k": 1}).json()["results"][0]["id"]
    assert client.get(f"/videos/{video}/frame", params={"t": "-1"}).status_code == 422
    assert client.get(f"/videos/{video}/frame", params={"t": "nan"}).status_code == 422
    late = client.get(f"/videos/{video}/frame", params={"t": 3600})  # past the end: the last frame
    assert late.status_code == 200 and late.headers["content-type"] == "image/jpeg"


def test_a_video_frame_is_captioned_by_its_id_and_time(video_world):
    """The page's Caption and Ask on a video result send mmfusion://videos/<id>?t=<its matched frame>."""
    _, truth, _, photo = video_world
    app = create_app(ServeSettings(db=str(video_world[0])), embedder=ColourEmbedder(), captioner=ColourCaptioner())
    with TestClient(app, base_url=LOCAL) as c:
        present = {o["colour"] for v in truth["videos"] for s in v["scenes"] for o in s["objects"]}
        for colour in sorted(present)[:3]:
            top = c.post("/search", json={"text": colour, "k": 1}).json()["results"][0]
            assert top["media"] == "video"
            ref = f"mmfusion://videos/{top['id']}?t={top['metadata']['thumb']}"
            caption = c.post("/v1/chat/completions", json=_chat(ref)).json()["choices"][0]["message"]["content"]
            assert colour in caption.split(), caption  # the frame the result matched, not the video's first
        video = c.post("/search", json={"text": "red", "k": 1}).json()["results"][0]["id"]
        for ref, status, words in (
            (f"mmfusion://images/{video}", 400, f"mmfusion://videos/{video}?t=SECONDS"),
            (f"mmfusion://videos/{photo}?t=1", 400, "is an image, not a video"),
            ("mmfusion://videos/99999?t=1", 404, "no indexed image or video"),
            (f"mmfusion://videos/{video}", 422, "write mmfusion://videos/<id>?t=SECONDS"),  # no time: named, not base64
        ):
            res = c.post("/v1/chat/completions", json=_chat(ref))
            assert res.status_code == status and words in res.json()["error"]["message"], res.text


def _chat(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def test_only_frame_thumbnails_are_cached(client):
    video = client.post("/search", json={"text": "red", "k": 1}).json()["results"][0]["id"]
    thumbs = client.app.state.service.thumbs.data
    before = len(thumbs)
    for t in (0.25, 0.5, 0.75):
        assert client.get(f"/videos/{video}/frame", params={"t": t}).status_code == 200
    assert len(thumbs) == before  # whole frames are not kept: their bytes would be unbounded
    assert client.get(f"/videos/{video}/frame", params={"t": 0.25, "thumb": "true"}).status_code == 200
    assert len(thumbs) == before + 1


def test_a_frame_over_max_pixels_is_refused_before_decoding(video_world):
    app = create_app(ServeSettings(db=str(video_world[0]), max_pixels=100), embedder=ColourEmbedder(),
                     captioner=ColourCaptioner())  # fmt: skip
    with TestClient(app, base_url=LOCAL) as c:
        video = c.post("/search", json={"text": "red", "k": 1}).json()["results"][0]["id"]
        for res in (c.get(f"/videos/{video}/frame", params={"t": 1}),
                    c.post("/v1/chat/completions", json=_chat(f"mmfusion://videos/{video}?t=1"))):  # fmt: skip
            assert res.status_code == 413, res.text
            assert "over this service's limit of 100" in res.json()["error"]["message"]


def test_video_errors_name_their_fix(client, monkeypatch):
    import mmfusion.index.video as video_mod

    video = client.post("/search", json={"text": "red", "k": 1}).json()["results"][0]["id"]
    missing = client.get("/videos/987654")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no indexed video has id 987654"
    for route in (f"/images/{video}", f"/thumbs/{video}"):  # a video is not served as an image
        res = client.get(route)
        assert res.status_code == 404 and f"/videos/{video}/frame" in res.json()["error"]["message"], route
        assert f"see /videos/{video} " in res.json()["error"]["message"]

    def no_pyav():
        raise video_mod.NoPyAVError(video_mod.NO_PYAV)

    monkeypatch.setattr(video_mod, "_pyav", no_pyav)
    res = client.get(f"/videos/{video}/frame", params={"t": 3.25})
    assert res.status_code == 503 and "pip install 'mmfusion[video]'" in res.json()["error"]["message"]
