"""Indexing and reading videos within bounds: frames shrunk by the decoder to the model's size and embedded a batch
at a time, segments pooled in one pass, frames refused when too large, and searches that stop fetching when more
hits cannot help."""

from __future__ import annotations

import wave

import numpy as np
import pytest

pytest.importorskip("av")

import mmfusion.index.video as video  # noqa: E402
from mmfusion.index.encoder import QueryEncoder  # noqa: E402
from mmfusion.index.search import MAX_FETCH, VIDEO_FETCH, VectorQuery, _next_fetch  # noqa: E402
from mmfusion.index.video import (  # noqa: E402
    VideoFileError,
    VideoInfo,
    VideoOptions,
    VideoTooLargeError,
    frame_at,
    iter_samples,
    pool_segments,
)
from tests.index.test_video_search import N_VIDEOS, gallery, index_videos, opened  # noqa: E402,F401


def _first_video(folder):
    return str(sorted(folder.glob("*.mp4"))[0])


def test_frames_are_shrunk_to_the_models_size_while_decoding(gallery):  # noqa: F811
    _, folder, truth = gallery
    path = _first_video(folder)
    info = VideoInfo()
    crops = list(iter_samples(path, VideoOptions(), 32, True, info))
    assert crops and all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for _, p, _ in crops)
    assert info.width > 32 and info.height > 32 and info.duration > 0
    whole = list(iter_samples(path, VideoOptions(), 32, False))  # a model that preprocesses: short side 32, uncropped
    assert [t for t, _, _ in whole] == [t for t, _, _ in crops]
    assert all(min(img.size) == 32 for _, img, _ in whole)
    full = next(iter_samples(path, VideoOptions(), None, False))[1]
    assert full.size == (info.width, info.height)  # no size: whole frames


def test_a_video_is_embedded_a_batch_at_a_time_as_it_is_decoded(gallery, monkeypatch):  # noqa: F811
    root, folder, _ = gallery
    decoded, calls = [0], []
    real_iter, real_encode = video.iter_samples, QueryEncoder.encode_pixels

    def counting_iter(*a, **kw):
        for sample in real_iter(*a, **kw):
            decoded[0] += 1
            yield sample

    def recording_encode(self, pixels, transform):
        calls.append((decoded[0], len(pixels)))
        return real_encode(self, pixels, transform)

    monkeypatch.setattr(video, "iter_samples", counting_iter)
    monkeypatch.setattr(QueryEncoder, "encode_pixels", recording_encode)
    report = index_videos(root, folder, batch_size=2)
    assert report.added == N_VIDEOS and not report.skipped
    assert len(calls) > N_VIDEOS and all(n <= 2 for _, n in calls)
    assert calls[0] == (2, 2)  # the first batch went to the model once its two frames were decoded, not after all


def test_segment_pooling_keeps_the_rule_of_the_whole_segments_mean():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 16)).astype(np.float32)
    vecs = np.repeat(base, 8, axis=0) + 0.3 * rng.normal(size=(40, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    times, cuts = [float(i) for i in range(40)], [i == 20 for i in range(40)]

    groups = [[0]]  # the rule as written: each sample against the mean of the whole current segment
    for i in range(1, 40):
        mean = vecs[groups[-1]].mean(0)
        if cuts[i] or vecs[i] @ (mean / np.linalg.norm(mean)) < 0.8:
            groups.append([i])
        else:
            groups[-1].append(i)
    segs = pool_segments(times, vecs, cuts, 40.0, similarity=0.8)
    assert [s["start_s"] for s in segs] == [0.0] + [times[g[0]] for g in groups[1:]]
    assert 4 <= len(segs) <= 20


def test_frame_at_refuses_too_many_pixels_before_decoding_and_a_file_without_video(gallery, tmp_path):  # noqa: F811
    _, folder, _ = gallery
    path = _first_video(folder)
    assert frame_at(path, 0.5, max_pixels=10**8).size[0] > 0
    with pytest.raises(VideoTooLargeError, match=r"pixels, over this service's limit of 100 \(raise --max-pixels"):
        frame_at(path, 0.5, max_pixels=100)
    sound = tmp_path / "tone.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(8000, np.int16).tobytes())
    with pytest.raises(VideoFileError, match="no video stream"):
        frame_at(str(sound), 0.0)
    with pytest.raises(VideoFileError, match="no video stream"):
        next(iter_samples(str(sound), VideoOptions(), 32))


def test_a_search_stops_fetching_once_the_last_hit_is_under_the_threshold(gallery, monkeypatch):  # noqa: F811
    root, folder, _ = gallery
    index_videos(root, folder)
    with opened(root) as ix:
        assert ix.info()["segments"] > 2 * VIDEO_FETCH  # the first fetch of a k=2 search leaves hits unread
        fetched = []
        real = ix.vi.search

        def counting(queries, k, *a, **kw):
            fetched.append(k)
            return real(queries, k, *a, **kw)

        monkeypatch.setattr(ix.vi, "search", counting)
        results = ix.search("red", k=2, threshold=0.999)
        assert fetched == [2 * VIDEO_FETCH]  # one round: every later hit scores under the threshold too
        assert all(r.score >= 0.999 for r in results)


class _Counts:
    def __init__(self, n: int):
        self.n, self.asked = n, []

    def vector_count(self, files) -> int:
        self.asked.append(set(files))
        return self.n


def test_a_round_that_adds_no_file_jumps_past_the_seen_files_vectors_instead_of_growing_blindly():
    q, scores = VectorQuery(np.zeros(4, np.float32), k=10), np.linspace(1.0, 0.5, 40)
    assert _next_fetch(_Counts(0), q, 40, scores, {1, 2}, set(), 2) == 40 * VIDEO_FETCH  # new files: grow
    store = _Counts(300)  # one long video holds the 160 hits of this round, as it held the last round's
    assert _next_fetch(store, q, 160, scores, {7}, {7}, 1) == 300 + 9 and store.asked == [{7}]
    assert _next_fetch(_Counts(10**6), q, 160, scores, {7}, {7}, 1) == MAX_FETCH
    assert _next_fetch(_Counts(0), q, MAX_FETCH, scores, {1}, set(), 1) == 0
    strict = VectorQuery(np.zeros(4, np.float32), k=10, threshold=0.6)  # the last hit, 0.5, is under it
    assert _next_fetch(_Counts(0), strict, 40, scores, {1, 2}, set(), 2) == 0
