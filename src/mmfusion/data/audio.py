"""Audio decoding and resampling with soundfile (libsndfile) and soxr (extra: ``pip install 'mmfusion[audio]'``).

:func:`load_audio` turns a file into what speech and audio models take: float32 mono samples in [-1, 1]
at one sampling rate. libsndfile reads WAV (any PCM width or float), FLAC, OGG (Vorbis, Opus), MP3, AIFF,
CAF and more; other containers (M4A/AAC, WebM, video files) are refused with a hint to convert them.
Integer PCM is scaled by its full range (int16 ``-32768`` -> ``-1.0``), channels are averaged, and the
rate is changed with soxr's high-quality band-limited resampler (no aliasing, flat pass band).

Nothing here is specific to one model: the transcriber, datasets of generated sounds and the service all
read audio through these two functions.

:class:`LogMel` turns batches of waveforms into log-mel spectrograms, the input of audio encoders: a
Slaney mel filterbank from librosa (built once), applied to a batched ``torch.stft`` power spectrum.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".caf", ".au", ".w64")
CONVERT_HINT = (
    "convert it to WAV or FLAC first, e.g. `ffmpeg -i INPUT -ac 1 -ar 16000 OUTPUT.wav` "
    "(soundfile/libsndfile reads WAV, FLAC, OGG/Vorbis/Opus, MP3 and AIFF, not M4A/AAC, WebM or video)"
)


class AudioDecodeError(ValueError):
    """A file that could not be read as audio; the message names the file and says why."""


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError) as e:  # OSError: the package is there but libsndfile is not
        raise ImportError(
            f"reading audio needs soundfile (libsndfile) and soxr: pip install 'mmfusion[audio]' ({e})"
        ) from e
    return soundfile


def _soxr():
    try:
        import soxr
    except ImportError as e:
        raise ImportError(f"resampling audio needs soxr: pip install 'mmfusion[audio]' ({e})") from e
    return soxr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """``x`` (samples,) or (samples, channels) from ``sr_in`` to ``sr_out`` Hz, as float32.

    soxr's high-quality resampler: the output has ``round(len(x) * sr_out / sr_in)`` samples (give or
    take one) and keeps every frequency below the lower Nyquist limit.
    """
    for name, sr in (("sr_in", sr_in), ("sr_out", sr_out)):
        if not isinstance(sr, (int, np.integer)) or isinstance(sr, bool) or sr <= 0:
            raise ValueError(f"{name} must be a positive whole number of Hz, got {sr!r}")
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected samples as (samples,) or (samples, channels), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sr_in == sr_out or x.shape[0] == 0:
        return x
    return np.ascontiguousarray(_soxr().resample(x, int(sr_in), int(sr_out), quality="HQ"), dtype=np.float32)


def to_mono(x: np.ndarray) -> np.ndarray:
    """(samples,) from (samples,) or (samples, channels): the channels' average."""
    x = np.asarray(x, dtype=np.float32)
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def load_audio(path: Any, sampling_rate: int | None = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Read an audio file as float32 mono samples in [-1, 1] at ``sampling_rate`` Hz.

    Args:
        path: a file path, or a binary file object (an open file, ``io.BytesIO``).
        sampling_rate: the rate to resample to; ``None`` keeps the file's own (see :func:`audio_info`).
        max_seconds: read at most this much from the start (the rest is never decoded).

    Raises:
        AudioDecodeError: the file is missing, is not audio, is in a format libsndfile cannot read
            (the message says how to convert it), or holds no samples.
        ImportError: soundfile or soxr is not installed.
    """
    x, sr = read_audio(path, max_seconds=max_seconds)
    x = to_mono(x)
    if sampling_rate is not None and sampling_rate != sr:
        x = resample(x, sr, sampling_rate)
    np.nan_to_num(x, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(x, -1.0, 1.0, out=x)  # float files may exceed full scale; resampling may overshoot slightly


def read_audio(path: Any, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(float32 samples of shape (samples, channels), the file's sampling rate), decoded as stored.

    Integer PCM is scaled to [-1, 1); float files are returned as they are. Errors as :func:`load_audio`.
    """
    sf = _soundfile()
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    name = _name(path)
    if isinstance(path, (str, os.PathLike)):
        p = Path(path).expanduser()
        if not p.exists():
            raise AudioDecodeError(f"{name}: file not found")
        if p.is_dir():
            raise AudioDecodeError(f"{name}: is a directory, not an audio file")
        if p.stat().st_size == 0:
            raise AudioDecodeError(f"{name}: the file is empty")
        path = str(p)
    try:
        with sf.SoundFile(path) as f:
            sr = int(f.samplerate)
            frames = -1 if max_seconds is None else max(1, int(round(max_seconds * sr)))
            x = f.read(frames, dtype="float32", always_2d=True)
    except FileNotFoundError as e:
        raise AudioDecodeError(f"{name}: file not found") from e
    except Exception as e:  # libsndfile reports every decoding problem as LibsndfileError (a RuntimeError)
        raise AudioDecodeError(f"{name}: {_reason(e)}") from e
    if x.shape[0] == 0:
        raise AudioDecodeError(f"{name}: the file holds no audio samples")
    return x, sr


def audio_info(path: str | os.PathLike) -> dict[str, Any]:
    """The header of an audio file without decoding it: sampling_rate, channels, frames, seconds, format."""
    sf = _soundfile()
    name = _name(path)
    if not Path(path).expanduser().is_file():
        raise AudioDecodeError(f"{name}: file not found")
    try:
        info = sf.info(str(Path(path).expanduser()))
    except Exception as e:
        raise AudioDecodeError(f"{name}: {_reason(e)}") from e
    return {
        "sampling_rate": int(info.samplerate),
        "channels": int(info.channels),
        "frames": int(info.frames),
        "seconds": float(info.frames) / info.samplerate if info.samplerate else 0.0,
        "format": info.format,
        "subtype": info.subtype,
    }


def _name(path: Any) -> str:
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return getattr(path, "name", None) or f"<{type(path).__name__}>"


def _reason(e: Exception) -> str:
    """A short reason from libsndfile's message, with a conversion hint for unreadable formats."""
    msg = str(e).strip()
    # soundfile says "Error opening 'path': Format not recognised." - the path is already in our message
    if ": " in msg and msg.startswith("Error opening"):
        msg = msg.split(": ", 1)[1]
    msg = msg.rstrip(".") or type(e).__name__
    low = msg.lower()
    if any(k in low for k in ("format not recognised", "format not recognized", "unknown format", "unsupported")):
        return f"not an audio format soundfile can read ({msg}); {CONVERT_HINT}"
    if "does not exist or is not a regular file" in low:  # what libsndfile says of a corrupt MP3 it found
        return f"not a valid audio file (libsndfile could not decode it); {CONVERT_HINT}"
    return f"could not decode the audio ({msg}); if the file plays elsewhere, {CONVERT_HINT}"


class LogMel(nn.Module):
    """Log-mel spectrograms of batches of waveforms, as librosa computes them, fast on batches.

    ``log(max(mel_power, floor))`` where ``mel_power`` is ``librosa.feature.melspectrogram`` with its
    defaults (centred frames with zero padding, a periodic Hann window, power 2, Slaney mel scale and
    area normalisation): librosa builds the filterbank once, ``torch.stft`` computes the spectra for the
    whole batch, on whatever device the module is on.

    Args:
        sample_rate: sampling rate of the input, in Hz.
        n_fft: samples per frame (400: 25 ms at 16 kHz).
        hop_length: samples between frames (160: 10 ms at 16 kHz, so 100 frames a second).
        n_mels: mel bands.
        fmin, fmax: the filterbank's range in Hz; ``fmax=None`` is the Nyquist frequency.
        floor: the smallest power kept before the log (1e-5 is 90 dB below a full-scale sine's peak bin),
            so silence gives a finite value.
        pad_mode: how the signal is padded for centred frames: "constant" (zeros, librosa's default)
            or "reflect".

    Shapes: waves (B, N) -> (B, n_mels, 1 + N // hop_length); (N,) -> (n_mels, frames).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        fmin: float = 0.0,
        fmax: float | None = None,
        floor: float = 1e-5,
        pad_mode: str = "constant",
    ):
        super().__init__()
        if fmax is not None and not fmin < fmax <= sample_rate / 2:
            raise ValueError(f"need fmin < fmax <= sample_rate / 2 = {sample_rate / 2}, got fmin={fmin}, fmax={fmax}")
        try:
            import librosa.filters  # imported here: librosa takes most of a second to import
        except ImportError as e:
            raise ImportError(f"log-mel features need librosa: pip install 'mmfusion[audio]' ({e})") from e
        mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, norm="slaney")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.floor, self.pad_mode = floor, pad_mode
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer("mel_basis", torch.from_numpy(mel).float(), persistent=False)  # (n_mels, n_fft//2 + 1)

    def forward(self, waves: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(waves, dtype=torch.float32, device=self.window.device)
        if x.dim() not in (1, 2):
            raise ValueError(f"expected waves of shape (N,) or (B, N), got {tuple(x.shape)}")
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_length,
            window=self.window,
            center=True,
            pad_mode=self.pad_mode,
            return_complex=True,
        )  # (B, n_fft//2 + 1, frames)
        power = spec.real**2 + spec.imag**2
        return torch.log(torch.matmul(self.mel_basis, power).clamp_min(self.floor))  # (B, n_mels, frames)

    def frames(self, n_samples: int) -> int:
        """Frames of a wave of ``n_samples`` samples."""
        return 1 + n_samples // self.hop_length

    def extra_repr(self) -> str:
        return f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, n_mels={self.n_mels}"
