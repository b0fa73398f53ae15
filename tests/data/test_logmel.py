"""LogMel: librosa's log-mel spectrogram, computed with torch.stft on batches."""

import numpy as np
import pytest
import torch

librosa = pytest.importorskip("librosa")

from mmfusion.data.audio import LogMel  # noqa: E402

SR = 16000


def _signals(n: int = 3, seconds: float = 0.5) -> np.ndarray:
    """(n, samples) chirps plus noise, a different one per row."""
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * seconds)) / SR
    rows = [
        0.5 * np.sin(2 * np.pi * (200 + 300 * k) * t * (1 + 2 * t)) + 0.05 * rng.standard_normal(len(t))
        for k in range(n)
    ]
    return np.stack(rows).astype(np.float32)


def test_shape_and_frames():
    lm = LogMel()
    x = torch.from_numpy(_signals(2))
    assert lm(x).shape == (2, 64, 1 + 8000 // 160) and lm.frames(8000) == 51
    assert lm(x[0]).shape == (64, 51)
    assert LogMel(n_mels=40, n_fft=512, hop_length=256)(x).shape == (2, 40, 1 + 8000 // 256)


def test_matches_librosa():
    x = _signals(3)
    lm = LogMel(n_mels=64, fmin=20.0, fmax=7600.0)
    ref = librosa.feature.melspectrogram(
        y=x, sr=SR, n_fft=400, hop_length=160, n_mels=64, fmin=20.0, fmax=7600.0, power=2.0
    )
    ref = np.log(np.maximum(ref, lm.floor))
    out = lm(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-3  # in log units: a relative error of 0.1% in power


def test_batch_equals_one_by_one_and_numpy_input():
    x = _signals(4)
    lm = LogMel()
    batch = lm(torch.from_numpy(x))
    for i in range(len(x)):
        assert torch.allclose(batch[i], lm(x[i]), atol=1e-5)


def test_silence_is_floored_and_bad_input_refused():
    lm = LogMel()
    out = lm(torch.zeros(1600))
    assert torch.isfinite(out).all() and torch.allclose(out, torch.full_like(out, float(np.log(lm.floor))))
    with pytest.raises(ValueError, match="shape"):
        lm(torch.zeros(1, 1, 1600))
    with pytest.raises(ValueError, match="fmax"):
        LogMel(fmax=9000.0)
