"""The ShapesWorld fusion tasks: deterministic, and each modality carries exactly what it should."""

import numpy as np
import pytest
import torch

from mmfusion.data.fusion_tasks import FusionTaskConfig, class_names, make_fusion_data
from mmfusion.data.shapes import COLOURS, SHAPES


@pytest.fixture(scope="module")
def comp():
    return make_fusion_data(FusionTaskConfig(task="complementary"), "train", 96)


def test_deterministic_and_splits_differ(comp):
    again = make_fusion_data(FusionTaskConfig(task="complementary"), "train", 96)
    assert torch.equal(again.features["image"], comp.features["image"]) and torch.equal(again.labels, comp.labels)
    torch.testing.assert_close(again.features["audio"], comp.features["audio"])
    test = make_fusion_data(FusionTaskConfig(task="complementary"), "test", 96)
    assert not torch.equal(test.features["image"], comp.features["image"])
    with pytest.raises(ValueError, match="split"):
        make_fusion_data(FusionTaskConfig(), "dev", 4)


def test_complementary_hides_colour_from_the_image(comp):
    img = comp.features["image"]
    assert img.shape == (96, 3, 32, 32) and img.dtype == torch.uint8
    assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])  # grey: no channel tells colour
    m = comp.meta
    assert (comp.labels.numpy() == m["shape"] * len(COLOURS) + m["colour"]).all()
    assert (m["sound_colour"] == m["colour"]).all()
    assert comp.class_names[int(comp.labels[0])] == f"{list(COLOURS)[m['colour'][0]]} {SHAPES[m['shape'][0]]}"
    # the brightest grey says nothing about the colour: its correlation with the colour index is weak
    brightness = img.float().amax(dim=(1, 2, 3)).numpy()
    assert abs(np.corrcoef(brightness, m["colour"])[0, 1]) < 0.35


def test_the_sound_says_the_colour():
    from mmfusion.data.sound import COLOUR_PITCH_HZ

    d = make_fusion_data(FusionTaskConfig(task="correspondence"), "train", 64)
    # the loudest mel band rises with the pitch of the sound's colour
    peak = d.features["audio"].mean(-1).argmax(-1).numpy()
    pitch = np.array([COLOUR_PITCH_HZ[list(COLOURS)[c]] for c in d.meta["sound_colour"]])
    assert np.corrcoef(peak, np.log(pitch))[0, 1] > 0.9
    match = d.meta["sound_colour"] == d.meta["colour"]
    assert (d.labels.numpy() == match).all() and 0.3 < match.mean() < 0.7
    assert d.class_names == ["mismatch", "match"] and class_names("complementary")[0] == "red circle"
    with pytest.raises(ValueError, match="unknown fusion task"):
        class_names("xor")
