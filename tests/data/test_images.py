import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.data.images import (
    AugmentConfig,
    ImageDecodeError,
    ImageTransform,
    augment,
    caption_allows_hflip,
    load_image,
    normalize_batch,
    resize_center_crop,
)
from tests.utils import write_png, write_truncated_png


def test_modes_become_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and np.asarray(img).min() == 255
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert tuple(np.asarray(load_image(tmp_path / "pal.png"))[0, 0]) == (255, 255, 255)  # transparent -> white
    Image.new("RGBA", (8, 8), (0, 0, 255, 255)).save(tmp_path / "rgba.png")
    assert tuple(np.asarray(load_image(tmp_path / "rgba.png"))[0, 0]) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_bad_files_raise_with_reason(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    write_truncated_png(tmp_path / "cut.png")
    for name in ("empty.png", "text.png", "cut.png", "missing.png"):
        with pytest.raises(ImageDecodeError):
            load_image(tmp_path / name)
    write_png(tmp_path / "big.png", (300, 300))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        load_image(tmp_path / "big.png", max_pixels=10_000)


def test_resize_center_crop_and_normalise():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 255, 255), (25, 0, 75, 50))  # white centre square
    out = resize_center_crop(img, 32)
    assert out.size == (32, 32) and np.asarray(out).mean() > 250
    t = ImageTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))([img, img])
    assert t.shape == (2, 3, 32, 32) and t.max().item() == pytest.approx(1.0, abs=0.02)
    x = normalize_batch(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(x, torch.full((1, 3, 4, 4), -2.0))


def test_flip_never_contradicts_left_right_captions():
    assert caption_allows_hflip("a red circle above a blue star")
    assert not caption_allows_hflip("a red circle to the left of a star")
    assert not caption_allows_hflip("a star on the Right")
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white
    cfg = AugmentConfig(enabled=True, brightness=0, contrast=0)
    flipped_any = False
    for seed in range(20):
        out = augment(arr, "a circle to the left of a square", cfg, np.random.default_rng(seed))
        assert out[:, :4].mean() == 255
        flipped_any |= augment(arr, "a circle above a square", cfg, np.random.default_rng(seed))[:, :4].mean() == 0
    assert flipped_any


def test_augment_is_deterministic_and_keeps_colours_close():
    arr = np.full((8, 8, 3), (200, 30, 30), np.uint8)
    cfg = AugmentConfig(enabled=True)
    a = augment(arr, "a red square", cfg, np.random.default_rng(1))
    b = augment(arr, "a red square", cfg, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert a[..., 0].mean() > a[..., 1].mean() + 100  # still red
