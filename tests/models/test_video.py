"""The video classifier: a registered family with a preset, a checkpoint like any other, trained from the CLI."""

import json

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.cli.main import main
from mmfusion.data.video import ACTIONS, ShapesVideo, ShapesVideoConfig
from mmfusion.models import create_model, save_model

TINY = {"frames": 4, "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
TINY_FLAGS = [f"--model.encoder.{k}={v}" for k, v in TINY.items()]


def _clips(n: int = 3) -> np.ndarray:
    video = ShapesVideo(ShapesVideoConfig(frames=4, image_size=16))
    return video.batch("test", range(n))[0]


def test_the_preset_is_registered_and_runs():
    assert "video-tiny" in mmfusion.list_models("video-*")
    model = create_model("video-tiny").eval()
    assert model.family == "video" and model.cfg.encoder.attention == "divided"
    assert model.cfg.class_names == list(ACTIONS)
    clips = ShapesVideo().batch("test", range(2))[0]  # the preset's geometry: 8 frames of 32 px
    probs = model.predict(clips)
    assert probs.shape == (2, 7) and torch.isfinite(probs).all()


@pytest.mark.parametrize("attention", ["divided", "joint", "pool"])
def test_save_load_round_trip(tmp_path, attention):
    torch.manual_seed(0)
    model = create_model("video-tiny", encoder={**TINY, "attention": attention}, class_names=["a", "b", "c"]).eval()
    clips = _clips()
    save_model(model, tmp_path / "m")
    loaded = mmfusion.load(tmp_path / "m")
    assert loaded.family == "video" and loaded.cfg == model.cfg
    torch.testing.assert_close(loaded.predict(clips), model.predict(clips))
    torch.testing.assert_close(loaded.encode_video(clips).norm(dim=-1), torch.ones(3))
    assert loaded.classify(clips) == model.classify(clips)


def test_video_files_go_in_as_they_are(tmp_path):
    pytest.importorskip("av")
    from mmfusion.data.video import write_video

    model = create_model("video-tiny", encoder=TINY).eval()
    frames = ShapesVideo(ShapesVideoConfig(frames=12, image_size=32)).sample("test", 0)[0]  # longer, larger
    path = write_video(tmp_path / "c.mp4", frames)
    assert model.predict([path]).shape == (1, 7)
    with pytest.raises(ValueError, match="uint8 frames"):
        model.preprocess(np.zeros((1, 4, 16, 16), np.uint8))


def test_train_video_from_the_cli_reports_top1_top5_and_confusion(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["-q", "train", "video", "--steps", "4", "--out", str(out), *TINY_FLAGS,
                 "--train.batch_size=8", "--train.progress=false", "--train.threads=1",
                 "--video.test_size=14"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out: top-1" in printed and "top-5" in printed and "directions" in printed
    report = json.loads((out / "eval" / "video.json").read_text())
    assert report["n"] == 14 and {"top1", "top5", "direction_accuracy", "macro_f1"} <= set(report["metrics"])
    assert (out / "eval" / "confusion.png").stat().st_size > 1000
    model = mmfusion.load(out)
    assert model.cfg.encoder.frames == 4 and model.meta["trained_on"]["source"] == "shapes"


def test_train_video_on_an_exported_folder(tmp_path, capsys):
    pytest.importorskip("av")
    data = tmp_path / "data"
    assert main(["-q", "data", "shapes", "--video", "--out", str(data), "--train", "10", "--test", "4",
                 "--video.frames=6", "--video.image_size=16"]) == 0  # fmt: skip
    assert (data / "train" / "video" / "000009.mp4").is_file() and (data / "video.json").is_file()
    (data / "train" / "video" / "000003.mp4").write_bytes(b"broken")
    out = tmp_path / "run"
    code = main(["-q", "train", "video", "--data", str(data), "--epochs", "1", "--out", str(out), *TINY_FLAGS,
                 "--train.batch_size=3", "--train.progress=false", "--train.threads=1"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "eval" / "video.json").read_text())
    assert report["n"] == 4
    assert mmfusion.load(out).meta["trained_on"]["skipped"] == 1
