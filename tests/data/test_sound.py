"""ShapesWorld sounds: pitch says colour, timbre and rhythm say shape, and nothing else in the world changes."""

import json

import numpy as np
import pytest

from mmfusion.cli.main import main
from mmfusion.data.export import export_shapes
from mmfusion.data.shapes import COLOURS, SHAPES, Obj, Scene, ShapesWorld
from mmfusion.data.sound import (
    COLOUR_PITCH_HZ,
    SHAPE_TIMBRE,
    SoundConfig,
    render_object_sound,
    render_sound,
)

SR = 16000


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _magnitude(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies in Hz, magnitude spectrum) of a Hann-windowed clip."""
    return np.fft.rfftfreq(len(x), 1 / SR), np.abs(np.fft.rfft(x * np.hanning(len(x))))


def _band(freqs: np.ndarray, mag: np.ndarray, f: float, rel: float = 0.03) -> float:
    return float(mag[(freqs > f * (1 - rel)) & (freqs < f * (1 + rel))].max())


def _signature(x: np.ndarray, f0: float) -> tuple[bool, bool, int]:
    """(even harmonics present, odd harmonics present, pulses a second) of one object's sound."""
    freqs, mag = _magnitude(x)
    peak = _band(freqs, mag, f0)
    even = _band(freqs, mag, 2 * f0) > 0.1 * peak  # 1/2 in a sawtooth, none in a sine or a square
    odd = _band(freqs, mag, 3 * f0) > 0.1 * peak  # 1/3 in a square or a sawtooth
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)  # 10 ms frames
    env = np.sqrt((frames**2).mean(1))[15:]  # after the latest onset (0.1 s) and its ramp
    env_mag = np.abs(np.fft.rfft((env - env.mean()) * np.hanning(len(env)), n=1000))  # 0.1 Hz resolution
    rate = np.fft.rfftfreq(1000, 0.01)[np.argmax(env_mag)]
    steady = env.std() < 0.1 * env.mean()
    return even, odd, 0 if steady else int(round(rate))


def test_same_seed_same_sound_and_other_seeds_differ():
    a = render_object_sound("red", "star", "large", _rng(1))
    assert np.array_equal(a, render_object_sound("red", "star", "large", _rng(1)))
    assert not np.allclose(a, render_object_sound("red", "star", "large", _rng(2)))
    scene = ShapesWorld().scene("test", 3)
    assert np.array_equal(render_sound(scene, _rng(5)), render_sound(scene.objects, _rng(5)))
    assert not np.allclose(render_sound(scene, _rng(5)), render_sound(scene, _rng(6)))


def test_object_sound_is_a_one_object_scene():
    scene = Scene((Obj("cross", "cyan", "small", 0.5, 0.5),), 40)
    assert np.array_equal(render_object_sound("cyan", "cross", "small", _rng(3)), render_sound(scene, _rng(3)))


def test_spectral_peak_is_the_colour_pitch_for_every_colour_and_shape():
    cfg = SoundConfig()
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            x = render_object_sound(colour, shape, "large", _rng(10 * i + j), cfg)
            freqs, mag = _magnitude(x)
            peak = freqs[np.argmax(mag)]
            assert abs(peak / COLOUR_PITCH_HZ[colour] - 1) <= cfg.detune + 0.005, (colour, shape, peak)


def test_pitches_are_far_apart_and_no_harmonic_of_each_other():
    f = np.array(sorted(COLOUR_PITCH_HZ.values()))
    semitones = 12 * np.log2(f[:, None] / f[None, :])
    assert np.allclose(np.diff(12 * np.log2(f)), 5.0, atol=0.01)  # fourths, far beyond +-2% detuning
    for k in (2, 3, 4, 5):  # no colour's harmonic lands within a semitone of another colour
        assert np.abs(np.abs(semitones) - 12 * np.log2(k)).min() > 0.9, k


def test_shapes_have_distinct_timbre_and_rhythm():
    cfg = SoundConfig(snr_db=20.0)
    for colour in ("orange", "cyan"):
        sigs = {}
        for shape in SHAPES:
            x = render_object_sound(colour, shape, "large", _rng(7), cfg)
            sigs[shape] = _signature(x, COLOUR_PITCH_HZ[colour])
            timbre = SHAPE_TIMBRE[shape]
            assert sigs[shape][2] == pytest.approx(timbre.pulses_per_second, abs=1), (shape, sigs[shape])
            assert sigs[shape][0] == (len(timbre.harmonics) > 1 and timbre.harmonics[1] > 0), shape
            assert sigs[shape][1] == (len(timbre.harmonics) > 2 and timbre.harmonics[2] > 0), shape
        assert len(set(sigs.values())) == len(SHAPES), sigs


def test_level_length_and_size_loudness():
    cfg = SoundConfig(seconds=0.5, snr_db=-5.0)  # a loud noisy mix of three large objects
    objs = [Obj(s, c, "large", 0.5, 0.5) for s, c in (("star", "red"), ("square", "white"), ("cross", "blue"))]
    for seed in range(5):
        x = render_sound(objs, _rng(seed), cfg)
        assert x.dtype == np.float32 and x.shape == (8000,) and np.abs(x).max() <= 1.0
    quiet = SoundConfig(snr_db=None)
    rms = {
        z: np.sqrt(np.mean(render_object_sound("green", "circle", z, _rng(0), quiet) ** 2)) for z in ("small", "large")
    }
    assert rms["large"] / rms["small"] == pytest.approx(2.0, rel=0.01)  # 6 dB
    with pytest.raises(ValueError, match="unknown colour"):
        render_object_sound("pink", "circle", "large", _rng(0))


def test_sound_leaves_images_captions_and_questions_unchanged():
    world, fresh = ShapesWorld(), ShapesWorld()
    for split, i in (("train", 0), ("test", 5), ("heldout", 2)):
        world.sound(world.scene(split, i))
        a, b = world.sample(split, i), fresh.sample(split, i)
        assert a.scene == b.scene and a.image.tobytes() == b.image.tobytes()
        assert a.captions == b.captions and a.questions == b.questions
    scene = world.scene("test", 5)
    assert np.array_equal(world.sound(scene), fresh.sound(scene))
    assert not np.allclose(world.sound(scene), world.sound(world.scene("test", 6)))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_writes_readable_wavs_the_records_point_at(tmp_path):
    sf = pytest.importorskip("soundfile")
    world, cfg = ShapesWorld(), SoundConfig(seconds=0.25)
    export_shapes(world, tmp_path / "with", {"test": 3}, zeroshot_per_class=0, progress=False, sound=cfg)
    split = tmp_path / "with" / "test"
    for name in ("captions.jsonl", "scenes.jsonl", "qa.jsonl"):
        assert all(
            r["sound"] == r["image"].replace("images/", "sounds/").replace(".png", ".wav")
            for r in _records(split / name)
        )
    for i, r in enumerate(_records(split / "scenes.jsonl")):
        x, sr = sf.read(split / r["sound"], dtype="float32")
        assert sr == SR and x.shape == (4000,) and sf.info(split / r["sound"]).subtype == "PCM_16"
        expected = world.sound(world.scene("test", i), cfg)
        assert np.abs(x - expected).max() <= 1.5 / 32768  # 16-bit quantisation only
    assert json.loads((tmp_path / "with" / "world.json").read_text())["sound"]["seconds"] == 0.25

    export_shapes(world, tmp_path / "without", {"test": 3}, zeroshot_per_class=0, progress=False)
    assert not (tmp_path / "without" / "test" / "sounds").exists()
    assert all("sound" not in r for r in _records(tmp_path / "without" / "test" / "captions.jsonl"))


def test_cli_sounds_option(tmp_path, capsys):
    pytest.importorskip("soundfile")
    out = tmp_path / "data"
    args = ["-q", "data", "shapes", "--out", str(out), "--train", "0", "--test", "2", "--heldout", "0"]
    args += ["--zeroshot-per-class", "0"]
    assert main([*args, "--sounds", "--sound.seconds=0.2", "--sound.snr_db=5"]) == 0
    assert "with sounds" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "test" / "sounds").iterdir()) == ["000000.wav", "000001.wav"]
    assert all("sound" in r for r in _records(out / "test" / "captions.jsonl"))
    assert main([*args, "--sound.seconds=0.2"]) == 2  # sound options without --sounds are refused
    assert "--sounds" in capsys.readouterr().err


def test_pink_noise_has_more_power_at_low_frequencies():
    x = {
        k: render_object_sound("white", "circle", "large", _rng(0), SoundConfig(snr_db=-20.0, noise=k))
        for k in ("white", "pink")
    }
    low = {
        k: _magnitude(v)[1][10:100].mean() / _magnitude(v)[1][4000:6000].mean() for k, v in x.items()
    }  # 10-100 vs 4-6 kHz
    assert low["pink"] > 5 * low["white"]
