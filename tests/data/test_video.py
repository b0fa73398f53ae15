"""ShapesWorld clips: seeded, told apart only by frame order; and MP4 files written and read back with PyAV."""

import json
import sys
from collections import Counter

import numpy as np
import pytest

from mmfusion.data.shapes import ShapesWorld
from mmfusion.data.video import (
    ACTIONS,
    REVERSED,
    ShapesVideo,
    ShapesVideoConfig,
    VideoDecodeError,
    VideoFolder,
    export_videos,
    normalize_video,
    read_video,
    sample_indices,
    write_video,
)

try:
    import av  # noqa: F401

    HAVE_AV = True
except ImportError:
    HAVE_AV = False
needs_av = pytest.mark.skipif(not HAVE_AV, reason="PyAV is the [video] extra")


def test_clips_are_seeded_and_deterministic():
    a, b = ShapesVideo(), ShapesVideo()
    for i in range(5):
        fa, la = a.sample("train", i)
        fb, lb = b.sample("train", i)
        assert la == lb and np.array_equal(fa, fb)
        assert fa.shape == (8, 32, 32, 3) and fa.dtype == np.uint8
    other = ShapesVideo(ShapesVideoConfig(seed=1))
    assert any(not np.array_equal(a.sample("train", i)[0], other.sample("train", i)[0]) for i in range(3))
    assert not np.array_equal(a.sample("train", 0)[0], a.sample("test", 0)[0])


def test_clips_use_their_own_random_stream():
    """Clips draw from a stream of their own: the scenes, captions and questions of a world stay as they were."""
    world = ShapesWorld()
    before = [world.sample("train", i) for i in range(3)]
    ShapesVideo().batch("train", range(3))
    after = [world.sample("train", i) for i in range(3)]
    assert [s.scene for s in before] == [s.scene for s in after]
    assert [s.captions for s in before] == [s.captions for s in after]


def test_every_action_is_drawn_and_the_object_moves_as_labelled():
    video = ShapesVideo(ShapesVideoConfig(max_distractors=0))
    counts = Counter(video.clip("train", i).action for i in range(700))
    assert set(counts) == set(ACTIONS) and min(counts.values()) > 70
    for i in range(60):
        c = video.clip("train", i)
        dx, dy = c.end.x - c.start.x, c.end.y - c.start.y
        dr, turn = c.end.radius - c.start.radius, c.end.angle - c.start.angle
        expected = {"left": dx < -0.25, "right": dx > 0.25, "up": dy < -0.25, "down": dy > 0.25,
                    "grow": dr > 0, "shrink": dr < 0, "rotate": abs(turn) > 1.0}  # fmt: skip
        assert expected[c.action], c
        assert c.start.shape != "circle"  # a rotating circle could not be seen turning
        for s in (0.0, 0.5, 1.0):  # the mover stays in the frame
            m = c.mover_at(s)
            assert m.radius <= m.x <= 1 - m.radius and m.radius <= m.y <= 1 - m.radius


def test_a_reversed_clip_is_its_twin_action():
    """Order is all that tells left from right: a left clip played backwards is, frame for frame, a right clip."""
    video = ShapesVideo()
    seen = set()
    for i in range(40):
        clip = video.clip("train", i)
        back = clip.reversed()
        assert back.action == REVERSED[clip.action] and back.reversed() == clip
        assert np.array_equal(video.render(clip)[::-1], video.render(back))
        seen.add(clip.action)
    assert {"left", "up", "grow"} <= seen
    # the twins come from the same distribution: where a frame puts the mover says nothing of the direction
    xs = {a: [] for a in ("left", "right")}
    for i in range(1500):
        c = video.clip("train", i)
        if c.action in xs:
            xs[c.action] += [c.start.x, c.end.x]
    assert abs(np.mean(xs["left"]) - np.mean(xs["right"])) < 0.03


def test_uniform_sampling_rule():
    assert sample_indices(8, 8).tolist() == list(range(8))
    assert sample_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sample_indices(100, 4).tolist() == [12, 37, 62, 87]
    with pytest.raises(ValueError):
        sample_indices(0, 8)


def _gradient_clip(frames: int, size: int = 32) -> np.ndarray:
    """Frames whose brightness codes their index (robust to lossy coding)."""
    levels = np.linspace(20, 235, frames).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, size, size, 3)).copy()


@needs_av
def test_write_read_round_trip_samples_uniformly(tmp_path):
    clip = _gradient_clip(16)
    path = write_video(tmp_path / "g.mp4", clip)
    got = read_video(path, frames=8)
    assert got.shape == (8, 32, 32, 3)
    want = clip[sample_indices(16, 8)]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 6  # H.264 at crf 15
    small = read_video(path, frames=3, size=16)
    assert small.shape == (3, 16, 16, 3)
    assert np.abs(small[:, 8, 8, 0].astype(int) - clip[sample_indices(16, 3), 0, 0, 0]).max() <= 6


@needs_av
def test_export_then_load_skips_corrupt_files(tmp_path, caplog):
    video = ShapesVideo()
    out = export_videos(video, tmp_path / "v", {"train": 6, "test": 2}, progress=False)
    meta = json.loads((out / "video.json").read_text())
    assert meta["actions"] == list(ACTIONS)
    rows = [json.loads(line) for line in (out / "train" / "labels.jsonl").read_text().splitlines()]
    assert rows[0]["video"] == "video/000000.mp4" and rows[0]["action"] == video.clip("train", 0).action
    (out / "train" / rows[2]["video"]).write_bytes(b"not a video at all")
    truncated = out / "train" / rows[4]["video"]
    truncated.write_bytes(truncated.read_bytes()[:200])
    data = VideoFolder.load(out / "train", frames=8, size=32, progress=False)
    assert len(data) == 4 and {f for f, _ in data.skipped} == {rows[2]["video"], rows[4]["video"]}
    assert "skipped 2 unreadable video" in caplog.text
    assert data.class_names == list(ACTIONS)
    for k, i in enumerate((0, 1, 3, 5)):  # what was decoded is what was rendered, up to the codec's loss
        assert data.labels[k] == ACTIONS.index(rows[i]["action"])
        assert np.abs(data.clips[k].astype(float) - video.sample("train", i)[0]).mean() < 4
    with pytest.raises(VideoDecodeError, match="not a video|InvalidData"):
        read_video(out / "train" / rows[2]["video"])


def test_normalize_video_layout():
    clips = np.stack([ShapesVideo().sample("train", i)[0] for i in range(2)])
    import torch

    x = normalize_video(torch.from_numpy(clips))
    assert x.shape == (2, 8, 3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x[1, 3, 0, 5, 7]) - (clips[1, 3, 5, 7, 0] / 255 - 0.48145466) / 0.26862954) < 1e-5


def test_a_missing_pyav_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mmfusion\[video\]'"):
        read_video(tmp_path / "x.mp4")
    with pytest.raises(ImportError, match="mmfusion\\[video\\]"):
        export_videos(ShapesVideo(), tmp_path / "out", {"train": 1}, progress=False)
    assert not (tmp_path / "out").exists()
