"""Audio decoding and resampling: formats, channels, PCM scaling, band-limited resampling, clear errors."""

import io
import sys

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from mmfusion.data.audio import AudioDecodeError, audio_info, load_audio, read_audio, resample  # noqa: E402


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def test_wav_8k_is_resampled_to_16k_keeping_the_tone(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(440, 8000, 1.0), 8000, subtype="PCM_16")
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 1
    assert abs(peak_hz(x, 16000) - 440) < 2
    assert 0.45 < np.abs(x[1000:-1000]).max() <= 0.51  # amplitude kept away from the edges


def test_stereo_44k_flac_becomes_mono_16k(tmp_path):
    left, right = sine(1000, 44100, 2.0, 0.6), sine(1000, 44100, 2.0, 0.2)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    native = load_audio(path, sampling_rate=None)
    np.testing.assert_allclose(native, (left + right) / 2, atol=1e-4)  # averaged channels
    x = load_audio(path, 16000)
    assert abs(len(x) - 32000) <= 1
    assert abs(peak_hz(x, 16000) - 1000) < 2
    assert abs(np.abs(x[2000:-2000]).max() - 0.4) < 0.01


def test_int16_pcm_is_scaled_to_minus_one_one(tmp_path):
    pcm = np.array([-32768, -16384, 0, 16384, 32767] * 100, dtype=np.int16)
    path = tmp_path / "pcm.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    x = load_audio(path, 16000)
    np.testing.assert_array_equal(x[:5], np.array([-1.0, -0.5, 0.0, 0.5, 32767 / 32768], dtype=np.float32))
    raw, sr = read_audio(path)
    assert sr == 16000 and raw.shape == (500, 1)


def test_float_files_are_clipped_to_full_scale(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([1.5, -2.0, 0.25, np.nan] * 10, dtype=np.float32), 16000, subtype="FLOAT")
    x = load_audio(path)
    assert x.min() >= -1.0 and x.max() <= 1.0 and np.isfinite(x).all()
    np.testing.assert_array_equal(x[:4], [1.0, -1.0, 0.25, 0.0])


@pytest.mark.parametrize("fmt", ["OGG", "MP3"])
def test_compressed_formats(tmp_path, fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, sine(440, 22050, 1.0), 22050, format=fmt)
    x = load_audio(path)
    assert abs(len(x) - 16000) < 1600  # lossy codecs pad a little
    assert abs(peak_hz(x, 16000) - 440) < 3


def test_max_seconds_and_file_objects(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, sine(300, 16000, 3.0), 16000)
    assert len(load_audio(path, max_seconds=0.5)) == 8000
    with open(path, "rb") as f:
        assert len(load_audio(f)) == 48000
    buf = io.BytesIO(path.read_bytes())
    np.testing.assert_array_equal(load_audio(buf, max_seconds=1.0), load_audio(path)[:16000])
    assert audio_info(path) == {"sampling_rate": 16000, "channels": 1, "frames": 48000, "seconds": 3.0,
                                "format": "WAV", "subtype": "PCM_16"}  # fmt: skip
    with pytest.raises(ValueError, match="max_seconds"):
        load_audio(path, max_seconds=0)


def test_resample():
    x = sine(440, 8000, 1.0)
    assert resample(x, 8000, 8000).dtype == np.float32
    np.testing.assert_array_equal(resample(x, 8000, 8000), x)
    up = resample(x, 8000, 16000)
    assert up.dtype == np.float32 and abs(len(up) - 16000) <= 1
    down = resample(sine(6000, 48000, 1.0), 48000, 8000)  # above the new Nyquist (4 kHz): removed, not aliased
    assert np.abs(down[200:-200]).max() < 0.01
    stereo = resample(np.stack([x, x], axis=1), 8000, 16000)
    assert stereo.shape[1] == 2 and abs(stereo.shape[0] - 16000) <= 1
    assert resample(np.zeros(0), 8000, 16000).shape == (0,)
    for bad in ((x, 0, 16000), (x, 8000, -1), (x, 8000.5, 16000), (np.zeros((2, 2, 2)), 8000, 16000)):
        with pytest.raises(ValueError):
            resample(*bad)


def test_errors_name_the_file_and_the_reason(tmp_path):
    with pytest.raises(AudioDecodeError, match=r"missing\.wav: file not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioDecodeError, match="directory"):
        load_audio(tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioDecodeError, match=r"empty\.wav: the file is empty"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.wav").write_text("these are notes, not sound\n" * 20)
    with pytest.raises(AudioDecodeError, match=r"notes\.wav: not an audio format.*ffmpeg") as e:
        load_audio(tmp_path / "notes.wav")
    assert isinstance(e.value, ValueError)
    (tmp_path / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 200)  # an MP4 container
    with pytest.raises(AudioDecodeError, match=r"song\.m4a: .*convert it to WAV or FLAC"):
        load_audio(tmp_path / "song.m4a")
    (tmp_path / "bad.mp3").write_bytes(b"\xff\xfb" + b"not an mp3 frame" * 64)
    with pytest.raises(AudioDecodeError, match=r"bad\.mp3: not a"):
        load_audio(tmp_path / "bad.mp3")
    silent = tmp_path / "nothing.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        load_audio(silent)


def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(440, 8000, 0.1), 8000)
    monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr now raises ImportError
    assert len(load_audio(path, sampling_rate=None)) == 800  # no resampling needed: no soxr needed
    with pytest.raises(ImportError, match=r"pip install 'mmfusion\[audio\]'"):
        load_audio(path, 16000)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(ImportError, match=r"pip install 'mmfusion\[audio\]'"):
        load_audio(path)
