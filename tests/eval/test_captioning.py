"""Captioning: the ShapesWorld attribute check on real scenes, and the captioning report end to end with a fake
captioner. BLEU and CIDEr-D themselves are tested in test_text_metrics.py."""

import json

import numpy as np
import pytest

from mmfusion.data.export import export_shapes
from mmfusion.data.shapes import Obj, Scene, ShapesWorld
from mmfusion.eval.captioning import (
    bleu,
    caption_attribute_accuracy,
    check_caption,
    cider,
    evaluate_captioner,
    summary_lines,
)

# --- ShapesWorld attributes -------------------------------------------------------------------------


def _scenes_by_count():
    world = ShapesWorld()
    found = {}
    for i in range(60):
        s = world.scene("test", i)
        found.setdefault(len(s.objects), s)
    return found[1], found[2], found[3]


def test_attribute_check_on_real_scenes():
    one, two, three = _scenes_by_count()
    (a,), (b, c), (d, e, f) = one.objects, two.objects, three.objects
    other = next(col for col in ("red", "blue", "green") if col != a.colour)
    assert check_caption(f"a small {a.colour} {a.shape}", one).correct
    assert check_caption(f"A picture of a {a.colour.upper()} {a.shape}.", one).correct
    assert check_caption(f"just one {a.colour} {a.shape} in the middle", one).correct
    wrong = check_caption(f"a {other} {a.shape}", one)
    assert not wrong.correct and wrong.missing == [a.name] and wrong.wrong == [f"{other} {a.shape}"]
    assert not check_caption(f"a {a.shape}", one).correct  # the colour is not named
    assert not check_caption(f"a {a.colour} object", one).correct  # nor the shape
    assert check_caption(f"{b.colour} {b.shape} and {c.colour} {c.shape}", two).correct
    assert check_caption(f"the {c.colour} {c.shape} is above the {b.colour} {b.shape}", two).correct
    assert not check_caption(f"a {b.colour} {b.shape}", two).correct  # misses an object
    assert not check_caption(f"a {b.colour} {b.shape}, a {c.colour} {c.shape} and a red cross", two).correct
    listed = f"three shapes: a {d.colour} {d.shape}, a large {e.colour} {e.shape} and a {f.colour} {f.shape}"
    assert check_caption(listed, three).correct
    assert not check_caption(f"three shapes including a {d.colour} {d.shape}", three).correct
    swapped = f"a {e.colour} {d.shape}, a {d.colour} {e.shape} and a {f.colour} {f.shape}"
    assert check_caption(swapped, three).correct == (d.colour == e.colour or d.shape == e.shape)


def test_attribute_check_counts_plurals_synonyms_and_references_back():
    scene = Scene((Obj("circle", "red", "small", 0.2, 0.2), Obj("circle", "red", "large", 0.7, 0.3),
                   Obj("diamond", "purple", "small", 0.5, 0.8)), 40)  # fmt: skip
    assert check_caption("two red circles and a purple diamond", scene).correct
    assert check_caption("red circles above a violet rhombus", scene).correct  # a plural without number: 2+
    assert check_caption("the red circle is left of the red circle. a purple diamond too", scene).correct
    assert not check_caption("a red circle and a purple diamond", scene).correct  # one circle too few
    assert not check_caption("three red circles and a purple diamond", scene).correct  # one too many
    two = Scene((Obj("circle", "red", "small", 0.2, 0.2), Obj("star", "blue", "large", 0.7, 0.7)), 40)
    assert check_caption("a red circle and a blue star. the circle is on the left.", two).correct
    assert not check_caption("a red circle and a blue star. the green circle is small.", two).correct


def test_every_shapesworld_caption_that_names_all_objects_passes_and_no_other():
    world = ShapesWorld()
    for split in ("test", "heldout"):
        for i in range(80):
            s = world.sample(split, i)
            assert check_caption(s.captions[0].text, s.scene).correct, s.captions[0].text
            for cap in s.captions[1:]:
                refs = cap.meaning["objects"]
                names_all = len(refs) == len(s.scene.objects) and all(r["colour"] and r["shape"] for r in refs)
                assert check_caption(cap.text, s.scene).correct == names_all, cap.text


def test_caption_attribute_accuracy_counts_rates():
    one, two, _ = _scenes_by_count()
    (a,), (b, _) = one.objects, two.objects
    acc = caption_attribute_accuracy([f"a {a.colour} {a.shape}", f"a {b.colour} {b.shape}"], [one, two])
    assert (acc.accuracy, acc.missing_rate, acc.wrong_rate) == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="one caption per scene"):
        caption_attribute_accuracy(["a"], [one, two])


# --- the report -------------------------------------------------------------------------------------


class FakeCaptioner:
    """Writes the scene's first reference caption for even scenes and a wrong one for odd scenes."""

    name = "fake-captioner"

    def __init__(self, world, n):
        self.by_pixels = {}
        for i in range(n):
            s = world.sample("test", i)
            self.by_pixels[np.asarray(s.image).tobytes()] = s.captions[0].text if i % 2 == 0 else "a grey banana"
        self.calls = []

    def caption(self, images, **options):
        self.calls.append(options)
        return [self.by_pixels[np.asarray(im).tobytes()] for im in images]


def test_evaluate_captioner_report_and_plots(tmp_path):
    world, n = ShapesWorld(), 8
    model = FakeCaptioner(world, n)
    rep = evaluate_captioner(model, "shapes", n=n, out=tmp_path, options={"num_beams": 2}, batch_size=3)
    assert model.calls == [{"num_beams": 2}] * 3
    assert rep["n"] == n and rep["model"] == "fake-captioner" and rep["options"] == {"num_beams": 2}
    m = rep["metrics"]
    assert m["attribute_accuracy"] == 0.5 and m["attribute_missing_rate"] == 0.5
    samples = [world.sample("test", i) for i in range(n)]
    cands = {i: model.by_pixels[np.asarray(s.image).tobytes()] for i, s in enumerate(samples)}
    refs = {i: [c.text for c in s.captions] for i, s in enumerate(samples)}
    assert [m[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(bleu(cands, refs).scores)
    assert m["CIDEr"] == pytest.approx(cider(cands, refs).score)
    first = samples[0].captions[0].text  # a reference caption itself: BLEU-4 is 1, or ~0.03 with no 4-gram
    assert rep["per_image"][0]["BLEU-4"] == pytest.approx(1.0 if len(first.split()) >= 4 else 1e-6**0.25, rel=1e-6)
    assert rep["per_image"][1]["CIDEr"] == 0.0 and rep["per_image"][1]["attributes_correct"] is False
    assert json.loads((tmp_path / "captioning.json").read_text())["metrics"] == pytest.approx(m)
    for p in rep["plots"].values():
        assert open(p, "rb").read(4) == b"\x89PNG"
    assert any("attribute accuracy 0.500" in line for line in summary_lines(rep))


def test_a_shapesworld_export_gives_the_same_numbers_as_the_stream(tmp_path):
    world, n = ShapesWorld(), 6
    export_shapes(world, tmp_path, {"test": n}, zeroshot_per_class=0, progress=False)
    a = evaluate_captioner(FakeCaptioner(world, n), "shapes", n=n)
    b = evaluate_captioner(FakeCaptioner(world, n), str(tmp_path), n=n)
    assert b["metrics"] == pytest.approx(a["metrics"])
    assert b["per_image"][0]["image"] == "images/000000.png"


def test_unreadable_folder_images_are_skipped_and_named(tmp_path, caplog):
    world = ShapesWorld()
    export_shapes(world, tmp_path, {"test": 4}, zeroshot_per_class=0, progress=False)
    (tmp_path / "test" / "images" / "000001.png").write_bytes(b"not a png")
    rep = evaluate_captioner(FakeCaptioner(world, 4), str(tmp_path), n=0)
    assert rep["n"] == 3 and "000001.png" not in {r["image"] for r in rep["per_image"]}
    assert "000001.png" in caplog.text
