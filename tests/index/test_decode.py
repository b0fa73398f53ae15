import io
import os

import numpy as np
import pytest
from PIL import Image

from mmfusion.data.images import ImageDecodeError
from mmfusion.index.decode import decode_bytes, decode_file
from tests.utils import huge_png_header, photo


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied_and_reported_in_the_size():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = decode_bytes(_bytes(img, "JPEG", exif=exif, quality=95), None)
    assert d.pixels.size == (20, 40) and (d.width, d.height) == (20, 40)
    top = np.asarray(d.pixels)[2, 10]
    assert top[2] > 200 and top[0] < 60  # blue ends up on top after the rotation


def test_modes_become_rgb():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    r, g, b = np.asarray(decode_bytes(_bytes(cmyk, "JPEG", quality=95), None).pixels)[8, 8]
    assert r < 40 and g > 200 and b > 200
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))  # 16-bit white
    assert np.asarray(decode_bytes(_bytes(deep, "PNG"), None).pixels).min() == 255
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1  # index 1 (red) is transparent: shown over white
    assert tuple(np.asarray(decode_bytes(_bytes(pal, "PNG", transparency=1), None).pixels)[0, 0]) == (255, 255, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    first = np.asarray(decode_bytes(buf.getvalue(), None).pixels)[4, 4]
    assert first[1] > 200 and first[0] < 60  # the first frame (green)


def test_model_size_output_and_reduced_scale_jpeg_decoding():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (12, 18, 3), dtype=np.uint8)).resize((1800, 1200), Image.BILINEAR)
    data = _bytes(big, "JPEG", quality=92)
    fast = decode_bytes(data, 64, draft=True)
    full = decode_bytes(data, 64, draft=False)
    assert fast.pixels.shape == full.pixels.shape == (64, 64, 3)
    assert (fast.width, fast.height) == (1800, 1200)
    # DCT scaling changes the pixels a little, not the picture
    assert np.abs(fast.pixels.astype(int) - full.pixels.astype(int)).mean() < 6


def test_bad_files_raise_with_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    good = photo(tmp_path / "ok.jpg", (64, 64))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:300])
    huge_png_header(tmp_path / "bomb.png")
    reasons = {}
    for name in ("empty.jpg", "text.png", "cut.jpg", "bomb.png", "missing.jpg"):
        with pytest.raises(ImageDecodeError) as e:
            decode_file(str(tmp_path / name), 32)
        reasons[name] = str(e.value)
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["text.png"]
    assert "truncated" in reasons["cut.jpg"] or "decode" in reasons["cut.jpg"]
    assert "pixels" in reasons["bomb.png"]
    assert "cannot read" in reasons["missing.jpg"]


def test_known_content_is_hashed_but_not_decoded(tmp_path):
    p = photo(tmp_path / "a.png")
    first = decode_file(str(p), 16)
    assert first.pixels is not None and len(first.digest) == 16
    again = decode_file(str(p), 16, known={first.digest}.__contains__)
    assert again.digest == first.digest and again.pixels is None


def test_heic_photos_when_the_decoder_is_installed(tmp_path):
    pytest.importorskip("pillow_heif")
    from mmfusion.index.scan import heic_supported, scan

    assert heic_supported()
    img = Image.new("RGB", (60, 40), (20, 200, 30))
    img.save(tmp_path / "phone.heic")
    (tmp_path / "broken.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20)
    assert sorted(os.path.basename(f.path) for f in scan([tmp_path]).files) == ["broken.heic", "phone.heic"]
    d = decode_file(str(tmp_path / "phone.heic"), 32)
    assert d.pixels.shape == (32, 32, 3) and (d.width, d.height) == (60, 40)
    r, g, b = d.pixels[16, 16]
    assert g > 170 and r < 60 and b < 70
    with pytest.raises(ImageDecodeError):
        decode_file(str(tmp_path / "broken.heic"), 32)


PILLOW_DEFAULT_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # 89,478,485: Image.MAX_IMAGE_PIXELS in a fresh process


def test_headers_up_to_our_limit_open_whatever_pillows_limit(tmp_path, monkeypatch, recwarn):
    from mmfusion.data.images import DEFAULT_MAX_PIXELS, open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)  # as a fresh process has it
    # 96 million pixels: under our default of 100 million, over Pillow's 89.5 million (a warning, an error before)
    assert open_image(huge_png_header(tmp_path / "a.png", 9800, 9800), DEFAULT_MAX_PIXELS).size == (9800, 9800)
    # 150 million with a limit of 200 million, which the option must be able to raise
    assert open_image(huge_png_header(tmp_path / "b.png", 12248, 12248), 200_000_000).size == (12248, 12248)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == 200_000_000  # raised to ours, never lowered by a smaller one since
    with pytest.raises(ImageDecodeError) as e:
        open_image(huge_png_header(tmp_path / "c.png", 40000, 40000), 200_000_000)
    assert str(e.value) == "1,600,000,000 pixels is over the limit of 200,000,000"  # Pillow's refusal, in our words
    assert open_image(tmp_path / "c.png", None).size == (40000, 40000)  # None: no limit, Pillow's neither
    assert Image.MAX_IMAGE_PIXELS is None


def test_our_limit_decides_and_says_so_even_where_pillow_would_refuse(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2,000 pixels
    p = photo(tmp_path / "p.png", (64, 48))  # 3,072 pixels
    assert decode_file(str(p), 16, max_pixels=4_000).pixels.shape == (16, 16, 3)
    with pytest.raises(ImageDecodeError) as e:
        decode_file(str(p), 16, max_pixels=3_000)
    assert str(e.value) == "64x48 = 3,072 pixels is over the limit of 3,000"
    # a header Pillow refuses outright (over twice its limit) is reported in our words, with its size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError) as e:
        decode_file(str(huge_png_header(tmp_path / "bomb.png", 300, 300)), 16, max_pixels=1_000)
    assert str(e.value) == "90,000 pixels is over the limit of 1,000"
    # under our limit, a damaged file is refused for what it is, not for its size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError) as e:
        decode_file(str(tmp_path / "bomb.png"), 16, max_pixels=100_000)
    assert "pixels" not in str(e.value)
