import json
import logging

import numpy as np
import pytest

from mmfusion.data.datasets import CaptionFolder, ClassFolder, DataFormatError, read_captions, read_qa
from mmfusion.data.export import export_shapes
from mmfusion.data.shapes import ShapesWorld
from tests.utils import write_png, write_truncated_png


def _caption_folder(root, lines):
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_several_captions_per_image_are_grouped(tmp_path):
    write_png(tmp_path / "images/a.png")
    write_png(tmp_path / "images/b.png", colour=(0, 0, 255))
    _caption_folder(
        tmp_path,
        [
            {"image": "images/a.png", "caption": "red"},
            {"image": "images/b.png", "caption": "blue"},
            {"image": "images/a.png", "caption": "a red square", "extra": 1},
        ],
    )
    recs = read_captions(tmp_path)
    assert [(r.image, r.captions) for r in recs] == [
        ("images/a.png", ["red", "a red square"]),
        ("images/b.png", ["blue"]),
    ]
    assert recs[0].extras[1] == {"extra": 1}
    folder = CaptionFolder(tmp_path, 16)
    assert folder.images.shape == (2, 16, 16, 3) and folder.images[1, 8, 8, 2] == 255


def test_malformed_lines_name_file_and_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "capt\n')
    with pytest.raises(DataFormatError, match=r"captions.jsonl:3: not valid JSON"):
        read_captions(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DataFormatError, match=r"captions.jsonl:1: needs a non-empty string 'caption'"):
        read_captions(tmp_path)
    (tmp_path / "captions.jsonl").write_text('["a.png", "x"]\n')
    with pytest.raises(DataFormatError, match=r":1: expected a JSON object"):
        read_captions(tmp_path)


def test_corrupt_images_are_skipped_counted_and_named(tmp_path, caplog):
    write_png(tmp_path / "images/good.png")
    write_truncated_png(tmp_path / "images/cut.png")
    (tmp_path / "images/zero.png").write_bytes(b"")
    _caption_folder(tmp_path, [{"image": f"images/{n}.png", "caption": n} for n in ("good", "cut", "zero", "gone")])
    with caplog.at_level(logging.WARNING):
        folder = CaptionFolder(tmp_path, 16)
    assert len(folder) == 1 and folder.records[0].image == "images/good.png"
    assert len(folder.report.skipped) == 3
    assert "skipped 3 unreadable image(s)" in caplog.text
    for name in ("cut.png", "zero.png", "gone.png"):
        assert name in caplog.text


def test_all_images_broken_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/zero.png").write_bytes(b"")
    _caption_folder(tmp_path, [{"image": "images/zero.png", "caption": "x"}])
    with pytest.raises(DataFormatError, match="none of the 1 images"):
        CaptionFolder(tmp_path, 16)


def test_class_folders_and_qa(tmp_path):
    write_png(tmp_path / "cls/red_circle/1.png")
    write_png(tmp_path / "cls/blue_star/1.png", colour=(0, 0, 255))
    write_png(tmp_path / "cls/blue_star/2.png", colour=(0, 0, 255))
    (tmp_path / "cls/blue_star/broken.png").write_bytes(b"oops")
    cf = ClassFolder.load(tmp_path / "cls", 8)
    assert cf.classes == ["blue star", "red circle"]
    assert list(cf.labels) == [0, 0, 1] and len(cf.report.skipped) == 1
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "a.png", "question": "how many?", "answer": 2}) + "\n")
    assert read_qa(tmp_path / "qa.jsonl")[0].answer == "2"
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "a.png", "answer": "x"}) + "\n")
    with pytest.raises(DataFormatError, match="qa.jsonl:1"):
        read_qa(tmp_path / "qa.jsonl")


def test_shapes_export_reads_back_with_the_shared_loaders(tmp_path):
    world = ShapesWorld()
    export_shapes(world, tmp_path, {"train": 12, "test": 5}, zeroshot_per_class=1, progress=False)
    folder = CaptionFolder(tmp_path / "train", 64)
    assert len(folder) == 12
    assert np.array_equal(folder.images[3], np.asarray(world.sample("train", 3).image))
    assert folder.records[3].captions == [c.text for c in world.sample("train", 3).captions]
    assert all("meaning" in e for e in folder.records[0].extras)
    assert len(read_qa(tmp_path / "test" / "qa.jsonl")) >= 5 * 4
    assert len(ClassFolder.load(tmp_path / "zeroshot" / "heldout", 64).classes) == len(world.cfg.heldout)
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["classes"]["heldout"] == list(world.cfg.heldout)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind
