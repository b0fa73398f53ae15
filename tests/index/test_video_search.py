"""Video search on ShapesWorld videos whose answer is known: each video is several scenes back to back, each
scene one object of a colour no other scene of that video has, so a colour query has one right segment per video
that holds the colour. The embedder truly works on ShapesWorld colours (tests/serve/test_browser.py's
ColourEmbedder: an image is its histogram over the palette, a text the colour words it names)."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest

pytest.importorskip("av")

from mmfusion.data.video_gallery import export_video_gallery, read_gallery  # noqa: E402
from mmfusion.index import Index  # noqa: E402
from mmfusion.index.store import SEGMENT_ID_BASE, Store  # noqa: E402
from mmfusion.index.video import NO_PYAV, format_range, parse_every, pool_segments  # noqa: E402
from tests.serve.test_browser import ColourEmbedder  # noqa: E402

N_VIDEOS = 4


class CountingEmbedder(ColourEmbedder):
    """The colour embedder, counting the images it embeds (a re-index must embed none)."""

    images = 0

    def encode_image(self, images, normalize: bool = True):
        CountingEmbedder.images += len(images) if isinstance(images, (list, tuple)) else 1
        return super().encode_image(images, normalize)


def make_gallery(root):
    """(folder of videos, ground truth) of N_VIDEOS ShapesWorld videos, one object per scene."""
    export_video_gallery(root / "gallery", n_videos=N_VIDEOS, seed=3, max_distractors=0)
    return root / "gallery" / "videos", read_gallery(root / "gallery")


@pytest.fixture()
def gallery(tmp_path):
    folder, truth = make_gallery(tmp_path)
    return tmp_path, folder, truth


def index_videos(root, folder, **kw):
    with Index.open(root / "db", model=CountingEmbedder(), write=True) as ix:
        return ix.update([folder], progress=False, **kw)


def opened(root, write: bool = False) -> Index:
    """The index, its queries embedded by the colour model (which the index records by name only)."""
    ix = Index.open(root / "db", write=write)
    ix.bind_model(ColourEmbedder())
    return ix


def scenes_with(truth, colour):
    """{video file name: the scene (start, end) whose object has ``colour``}."""
    out = {}
    for v in truth["videos"]:
        for s in v["scenes"]:
            if s["objects"][0]["colour"] == colour:
                out[os.path.basename(v["file"])] = (s["start"], s["end"])
    return out


def test_a_colour_query_finds_each_video_holding_it_at_the_right_segment(gallery):
    root, folder, truth = gallery
    report = index_videos(root, folder)
    assert report.added == N_VIDEOS and not report.skipped
    with opened(root) as ix:
        info = ix.info()
        assert info["videos"] == N_VIDEOS
        assert info["segments"] == sum(len(v["scenes"]) for v in truth["videos"])  # a segment per scene
        checked = 0
        for colour in ("red", "green", "blue", "yellow", "purple"):
            want = scenes_with(truth, colour)
            results = ix.search(colour, k=N_VIDEOS)
            assert len({r.id for r in results}) == len(results) == N_VIDEOS  # a video is one result
            hits = [r for r in results if r.score > 0.5]
            assert {os.path.basename(r.path) for r in hits} == set(want), colour
            assert all(r.score < 0.1 for r in results[len(hits) :])  # the others come after
            for r in hits:
                start, end = want[os.path.basename(r.path)]
                m = r.metadata
                assert m["media"] == "video" and m["format"] == "video/mp4"
                assert (m["start"], m["end"]) == pytest.approx((start, end), abs=1e-3), (colour, r.path)
                assert start <= m["thumb"] < end
                assert m["segments"][0] == {"start": m["start"], "end": m["end"], "thumb": m["thumb"],
                                            "score": pytest.approx(r.score, abs=1e-6)}  # fmt: skip
                checked += 1
        assert checked >= 6


def test_reindex_makes_no_model_call_and_renames_copies_and_deletions_follow(gallery):
    root, folder, truth = gallery
    index_videos(root, folder)
    CountingEmbedder.images = 0
    again = index_videos(root, folder)
    assert (again.unchanged, again.model_calls, CountingEmbedder.images) == (N_VIDEOS, 0, 0)
    first, second, third = sorted(folder.iterdir())[:3]
    os.utime(first, ns=(1, 1))  # touched: same content
    moved = folder / "renamed.mp4"
    second.rename(moved)
    shutil.copy(third, folder / "copy.mp4")
    with opened(root) as ix:
        old_ids = {os.path.basename(r.path): r.id for r in ix.search("red", k=10)}
        before = ix.store.segments(file_ids=[old_ids[second.name]])
    report = index_videos(root, folder)
    assert (report.touched, report.renamed, report.duplicates, report.model_calls) == (1, 1, 1, 0)
    assert CountingEmbedder.images == 0
    with opened(root, write=True) as ix:
        by_name = {os.path.basename(r.path): r for r in ix.search("red", k=10)}
        assert by_name["renamed.mp4"].id == old_ids[second.name]  # a rename keeps its id and segments
        assert ix.store.segments(file_ids=[old_ids[second.name]]) == before
        copy, original = by_name["copy.mp4"], by_name[third.name]
        assert (copy.metadata["start"], copy.score) == (original.metadata["start"], original.score)
        assert ix.check(full=True).problems == []
    (folder / "copy.mp4").unlink()
    report = index_videos(root, folder)
    assert report.removed == 1 and report.model_calls == 0
    with Index.open(root / "db", write=True) as ix:
        assert ix.store.segments(file_ids=[copy.id]) == {}  # its segments went with it
        assert ix.check(full=True).problems == []  # and their vectors left FAISS
        assert len(ix.vi.ids()) == ix.info()["segments"]


def test_a_corrupt_video_is_skipped_and_reported_never_fatal(gallery):
    root, folder, truth = gallery
    (folder / "garbage.mp4").write_bytes(b"this is not a video at all" * 100)
    good = sorted(folder.glob("video_*.mp4"))[0]
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[:300])
    report = index_videos(root, folder)
    assert report.added == N_VIDEOS
    skipped = dict(report.skipped)
    assert set(map(os.path.basename, skipped)) == {"garbage.mp4", "truncated.mp4"}
    assert all(why.startswith("video: ") for why in skipped.values())
    assert any("skipped 2: video" in line for line in report.summary())


def test_without_pyav_videos_are_skipped_with_one_message_naming_the_extra(gallery, monkeypatch):
    import mmfusion.index.video as video

    root, folder, _ = gallery
    monkeypatch.setattr(video, "pyav_available", lambda: False)
    report = index_videos(root, folder)
    assert report.added == 0 and len(report.skipped) == N_VIDEOS
    assert {why for _, why in report.skipped} == {NO_PYAV}
    assert f"  skipped {N_VIDEOS}: {NO_PYAV}" in report.summary()
    assert "pip install 'mmfusion[video]'" in NO_PYAV


def test_filters_and_images_mix_with_videos(gallery):
    from mmfusion.data.shapes import ShapesWorld

    root, folder, truth = gallery
    photo = ShapesWorld().sample("test", 0)
    photo.image.save(folder / "photo.png")
    index_videos(root, folder)
    colour = photo.scene.objects[0].colour
    with opened(root) as ix:
        results = ix.search(colour, k=N_VIDEOS + 1)
        media = {os.path.basename(r.path): r.metadata["media"] for r in results}
        assert media["photo.png"] == "image" and "start" not in results[[*media].index("photo.png")].metadata
        assert sum(m == "video" for m in media.values()) == N_VIDEOS
        only = ix.search(colour, k=5, path="video_001")  # a path filter reaches the segments of that video
        assert [os.path.basename(r.path) for r in only] == ["video_001.mp4"]
        fewer = ix.search(colour, k=2)  # the same first ones (listing fewer other moments: those in the top 2)
        assert [(r.id, r.score, r.metadata.get("start")) for r in fewer] == [
            (r.id, r.score, r.metadata.get("start")) for r in results[:2]
        ]


def test_pool_segments_merges_similar_frames_and_splits_at_cuts():
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    near_a = np.array([0.95, 0.31, 0, 0], np.float32)  # cosine 0.95 to a
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    vecs = np.stack([a, near_a, b, b, b, b])
    segs = pool_segments(times, vecs, [False, False, False, False, True, False], 6.5, similarity=0.9)
    assert [(s["start_s"], s["end_s"]) for s in segs] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.5)]
    assert segs[0]["thumb_s"] in (0.0, 1.0) and np.isclose(np.linalg.norm(segs[0]["vector"]), 1.0)
    strict = pool_segments(times, vecs, [False] * 6, 6.5, similarity=0.99)  # no cut: b's four frames stay one
    assert [(s["start_s"], s["end_s"]) for s in strict] == [(0.0, 1.0), (1.0, 2.0), (2.0, 6.5)]


def test_durations_and_ranges_read_as_people_write_them():
    assert [parse_every(x) for x in ("1s", "0.5", "500ms", "2s", " 3 s")] == [1.0, 0.5, 0.5, 2.0, 3.0]
    for bad in ("0s", "-1s", "fast", ""):
        with pytest.raises(ValueError, match="positive duration"):
            parse_every(bad)
    assert format_range(4.2, 6.4) == "00:04-00:06" and format_range(3725, 3730) == "1:02:05-1:02:10"


def test_a_schema_1_index_is_read_and_migrated(gallery):
    root, folder, _ = gallery
    index_videos(root, folder.parent / "nothing")  # an empty index
    db = sqlite3.connect(root / "db" / "index.sqlite")
    db.executescript("DROP TABLE segments; DELETE FROM sqlite_sequence WHERE name = 'segments';")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.commit()
    db.close()
    reader = Store(root / "db", readonly=True)  # schema 1, read as it is: no segments
    assert reader.meta("schema") == 1 and not reader.has_segments() and reader.ids().tolist() == []
    reader.close()
    report = index_videos(root, folder)  # a writer migrates it, then indexes videos
    assert report.added == N_VIDEOS
    with Index.open(root / "db") as ix:
        assert ix.store.meta("schema") == 2
        segments = ix.store.segments(file_ids=range(1, N_VIDEOS + 1))
        assert segments and min(segments) >= SEGMENT_ID_BASE  # the migrated table numbers segments apart from files


def test_cli_search_prints_the_time_range_and_json_carries_it(gallery, monkeypatch, capsys):
    import json

    import mmfusion.index.collection as collection
    from mmfusion.cli.main import main

    root, folder, truth = gallery
    index_videos(root, folder)
    monkeypatch.setattr(collection, "load_embedder", lambda ref: ColourEmbedder())  # the index records its name
    want = scenes_with(truth, "red")
    assert main(["search", "red", "--db", str(root / "db"), "-k", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    name = line.split("/")[-1].split()[0]
    assert name in want and line.endswith(format_range(*want[name]))
    assert main(["search", "red", "--db", str(root / "db"), "-k", "1", "--json"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)
    assert hit["media"] == "video" and (hit["start"], hit["end"]) == pytest.approx(want[os.path.basename(hit["path"])])
