import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mmfusion.index import AnnConfig, Index, IndexLockedError, IndexMismatchError, Term, VectorQuery
from tests.utils import huge_png_header, photo, tiny_clip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model") / "clip")


def _folder(root, n=12, start=0):
    for i in range(start, start + n):
        photo(root / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.{'png' if i % 2 else 'jpg'}", seed=i)
    return root


def _vectors_by_path(ix):
    out = {}
    for ids, vecs in ix.store.iter_vectors():
        rows = ix.store.get(ids)
        out.update((rows[int(i)].path, v) for i, v in zip(ids, vecs))
    return out


def test_first_run_then_nothing_to_do(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos")
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        r = ix.update([photos], progress=False)
        assert (r.added, r.model_calls, r.skipped) == (12, 12, [])
        assert ix.check(full=True).problems == []
    with Index.open(tmp_path / "db", write=True) as ix:  # the model is remembered
        r = ix.update([photos], progress=False)
        assert (r.unchanged, r.added, r.model_calls, r.removed) == (12, 0, 0, 0)
    assert list((tmp_path / "db" / "reports").glob("index-*.json"))


def test_renames_copies_touches_edits_and_removals(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos")
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
        before = _vectors_by_path(ix)
        old_id = ix.store.stats_by_path()[str(photos / "img001.png")][0]
    os.rename(photos / "img001.png", photos / "renamed.png")
    shutil.copy(photos / "img002.jpg", photos / "sub" / "copy.jpg")
    os.utime(photos / "img004.jpg", ns=(1_000_000_000, 1_000_000_000))  # mtime only
    photo(photos / "img005.png", seed=99)  # new content under an old name
    os.unlink(photos / "img007.png")
    with Index.open(tmp_path / "db", write=True) as ix:
        r = ix.update([photos], progress=False)
        # the rename is not also a removal: only img007 was removed
        assert (r.renamed, r.duplicates, r.touched, r.updated, r.removed) == (1, 1, 1, 1, 1)
        assert r.model_calls == 1  # only the edited file
        assert ix.store.stats_by_path()[str(photos / "renamed.png")][0] == old_id  # the row moved, id and all
        after = _vectors_by_path(ix)
        assert ix.check(full=True).problems == []
    p = str(photos)
    assert np.array_equal(after[f"{p}/renamed.png"], before[f"{p}/img001.png"])
    assert np.array_equal(after[f"{p}/sub/copy.jpg"], before[f"{p}/img002.jpg"])
    assert not np.allclose(after[f"{p}/img005.png"], before[f"{p}/img005.png"])
    assert f"{p}/img007.png" not in after and f"{p}/img001.png" not in after
    assert len(after) == 12


def test_a_rename_is_one_rename_and_no_removal(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 4)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
        ids = {p: row[0] for p, row in ix.store.stats_by_path().items()}
        hits = ix.search(text="a red circle", k=4)
    os.rename(photos / "img001.png", photos / "moved.png")
    with Index.open(tmp_path / "db", write=True) as ix:
        r = ix.update([photos], progress=False)
        assert (r.renamed, r.removed, r.added, r.duplicates, r.model_calls) == (1, 0, 0, 0, 0)
        assert "1 renamed" in r.summary()[0] and "0 removed" in r.summary()[0]
        now = {p: row[0] for p, row in ix.store.stats_by_path().items()}
        assert now[str(photos / "moved.png")] == ids[str(photos / "img001.png")] and len(now) == 4
        moved = {str(photos / "img001.png"): str(photos / "moved.png")}
        assert [(h.id, moved.get(h.path, h.path)) for h in ix.search(text="a red circle", k=4)] == [
            (h.id, moved.get(h.path, h.path)) for h in hits
        ]
        assert ix.check(full=True).problems == []
    # moved and copied at once: one of the new paths takes the row over, the other is a duplicate
    os.rename(photos / "moved.png", photos / "a.png")
    shutil.copy(photos / "a.png", photos / "b.png")
    with Index.open(tmp_path / "db", write=True) as ix:
        r = ix.update([photos], progress=False)
        assert (r.renamed, r.duplicates, r.removed, r.model_calls) == (1, 1, 0, 0)
        assert ix.store.stats_by_path()[str(photos / "a.png")][0] == ids[str(photos / "img001.png")]
        assert ix.store.count() == 5 and ix.check(full=True).problems == []


def test_a_failed_first_open_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="say which model"):
        Index.open(tmp_path / "db", write=True)
    with pytest.raises(Exception, match="nope"):  # the loader's error, which says where it looked
        Index.open(tmp_path / "db", model=tmp_path / "nope", write=True)
    assert not (tmp_path / "db").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="nope"):
        Index.open(tmp_path / "mine", model=tmp_path / "nope", write=True)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # only what the open made is gone


def test_the_max_pixels_option_is_the_limit_that_counts(tmp_path, model_dir, monkeypatch):
    # Pillow's own limit, lowered so that these small photos are "bombs" to Pillow (over twice its limit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    photos = _folder(tmp_path / "photos", 3)  # 48x32 = 1,536 pixels each
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        r = ix.update([photos], max_pixels=1_000, progress=False)
        assert r.added == 0 and {why for _, why in r.skipped} == {"48x32 = 1,536 pixels is over the limit of 1,000"}
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        r = ix.update([photos], max_pixels=2_000, progress=False)
        assert (r.added, r.skipped) == (3, [])
        assert Image.MAX_IMAGE_PIXELS == 2_000  # raised to ours, never lowered


def test_a_missing_or_empty_root_removes_nothing(tmp_path, model_dir):
    photos = _folder(tmp_path / "disk")
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
    os.rename(photos, tmp_path / "unplugged")
    with Index.open(tmp_path / "db", write=True) as ix:
        r = ix.update([photos], progress=False)
        assert r.removed == 0 and r.missing_roots == [str(photos)]
        assert "nothing under it was removed" in "\n".join(r.summary())
        photos.mkdir()  # an empty mount point
        r = ix.update([photos], progress=False)
        assert r.removed == 0 and ix.store.count() == 12


def test_nasty_files_are_skipped_with_reasons_and_good_ones_match_one_by_one(tmp_path, model_dir):
    root = tmp_path / "nasty"
    good = {
        "plain.jpg": photo(root / "plain.jpg", (300, 200), seed=1, quality=90),
        "cmyk.jpg": None,
        "deep.png": None,
        "palette.png": None,
        "anim.gif": None,
        "rotated.jpg": None,
        "png-named.jpg": photo(root / "png-named.jpg", seed=2, fmt="PNG"),
        os.fsdecode(b"caf\xe9.png"): photo(root / os.fsdecode(b"caf\xe9.png"), seed=3),
    }
    Image.new("CMYK", (40, 30), (0, 200, 100, 0)).save(root / "cmyk.jpg")
    Image.fromarray((np.arange(1200, dtype=np.uint16) * 50).reshape(30, 40)).save(root / "deep.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(root / "palette.png", transparency=1)
    frames = [Image.new("RGB", (40, 30), c) for c in ((0, 255, 0), (255, 0, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(good["plain.jpg"]).save(root / "rotated.jpg", exif=exif)
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good["plain.jpg"].read_bytes()[:400])
    (root / "text.png").write_text("not a picture")
    huge_png_header(root / "huge.png")
    os.symlink(root, root / "loop")
    outside = photo(tmp_path / "outside" / "o.jpg")
    os.symlink(outside, root / "escape.jpg")
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        r = ix.update([root], batch_size=3, workers=2, progress=False)
        reasons = {os.path.basename(p): why for p, why in r.skipped}
        assert set(reasons) == {"zero.jpg", "truncated.jpg", "text.png", "huge.png", "loop", "escape.jpg"}
        assert "empty" in reasons["zero.jpg"] and "pixels" in reasons["huge.png"]
        assert "not an image" in reasons["text.png"] and "outside" in reasons["escape.jpg"]
        stored = _vectors_by_path(ix)
        assert sorted(os.path.basename(p) for p in stored) == sorted(good)
        for path, vec in stored.items():  # batched, threaded indexing == embedding each file alone
            assert np.allclose(vec, ix.embed_image(path), atol=1e-5), path
        rot = ix.search(like=next(i for i, row in ix.store.get(ix.store.ids()).items() if "rotated" in row.path))
        assert rot[0].metadata["width"] == 200 and rot[0].metadata["height"] == 300
        assert "skipped 1: not an image" in "\n".join(r.summary())


def test_one_writer_at_a_time_and_readers_meanwhile(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 4)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
        with pytest.raises(IndexLockedError, match="one writer at a time"):
            Index.open(tmp_path / "db", write=True)
        with Index.open(tmp_path / "db") as reader:
            assert len(reader.search("a red circle", k=3)) == 3
    Index.open(tmp_path / "db", write=True).close()  # released


def test_another_model_is_refused(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 3)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
    other = tiny_clip(tmp_path / "other", seed=1)
    with pytest.raises(IndexMismatchError, match="never mixes models"):
        Index.open(tmp_path / "db", model=other, write=True)
    with pytest.raises(ValueError, match="say which model"):
        Index.open(tmp_path / "fresh", write=True)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(FileNotFoundError, match="mmfusion index"):
        Index.open(tmp_path / "nowhere")


def test_search_matches_an_exact_reference_with_filters(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 30)
    os.utime(photos / "img010.jpg", (1_600_000_000, 1_600_000_000))  # 2020-09-13
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
        vecs = _vectors_by_path(ix)
        paths = list(vecs)
        mat = np.stack([vecs[p] for p in paths])
        q = ix.embed_text("a blue square")
        ref = [paths[i] for i in np.argsort(-(mat @ q), kind="stable")[:7]]
        got = ix.search(text="a blue square", k=7)
        assert [g.path for g in got] == ref
        assert np.allclose([g.score for g in got], np.sort(mat @ q)[::-1][:7], atol=1e-5)
        sub = ix.search(text="a blue square", k=50, path="*/sub/*")
        assert sub and all("/sub/" in g.path for g in sub)
        assert len(sub) == sum("/sub/" in p for p in paths)
        old = ix.search(text="x", k=50, before=1_700_000_000)
        assert [g.path for g in old] == [str(photos / "img010.jpg")]
        assert ix.search(text="x", k=5, threshold=2.0) == []
        # arithmetic: text + image - text, and an indexed image by id
        img = str(photos / "img001.png")
        mix = ix.search(f"red + {img} - 'blue'", k=3)
        expect = ix.embed_text("red") + ix.embed_image(img) - ix.embed_text("blue")
        expect /= np.linalg.norm(expect)
        assert mix[0].path == paths[int(np.argmax(mat @ expect))]
        first = got[0]
        assert ix.search(like=first.id, k=1)[0].id == first.id


def test_search_many_gives_each_query_what_it_gets_alone(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 30)
    os.utime(photos / "img010.jpg", (1_600_000_000, 1_600_000_000))
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
        texts = ["a blue square", "a red circle", "green", "a small yellow star"]
        vecs = [ix.embed_text(t) for t in texts]
        queries = [VectorQuery(vecs[0], k=3), VectorQuery(vecs[1], k=9), VectorQuery(vecs[2], k=50, path="*/sub/*"),
                   VectorQuery(vecs[3], k=50, before=1_700_000_000), VectorQuery(vecs[0], k=30, threshold=-2.0),
                   VectorQuery(vecs[1], k=5, threshold=2.0), VectorQuery(vecs[2], k=5, path="nowhere/*")]  # fmt: skip
        together = ix.search_many(queries)
        alone = [ix.search([Term(1.0, "vector", q.vector)], k=q.k, threshold=q.threshold, path=q.path,
                           after=q.after, before=q.before) for q in queries]  # fmt: skip
        assert [[(r.id, round(r.score, 5)) for r in rs] for rs in together] == [
            [(r.id, round(r.score, 5)) for r in rs] for rs in alone
        ]
        assert [len(r) for r in together] == [3, 9, 10, 1, 30, 0, 0]  # 10 of 30 files are in sub/
        assert ix.search_many([]) == []


def test_approximate_layout_past_the_threshold(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 40)
    with Index.open(tmp_path / "db", model=model_dir, write=True, ann=AnnConfig(ivf_threshold=30)) as ix:
        ix.update([photos], progress=False)
        assert ix.info()["index_type"].startswith("ivf")
        assert ix.check().problems == []
        got = ix.search(text="a green star", k=5)
        assert len(got) == 5


def test_copies_inside_one_run_are_embedded_once(tmp_path, model_dir):
    photos = tmp_path / "photos"
    src = photo(photos / "a.png", seed=5)
    for i in range(3):
        shutil.copy(src, photos / f"copy{i}.png")
    photo(photos / "b.png", seed=6)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        r = ix.update([photos], batch_size=8, progress=False)
        assert (r.model_calls, r.added, r.duplicates) == (2, 2, 3)
        vecs = _vectors_by_path(ix)
        assert all(np.array_equal(vecs[str(photos / f"copy{i}.png")], vecs[str(src)]) for i in range(3))
