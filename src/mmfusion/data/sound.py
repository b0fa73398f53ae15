"""Sounds of ShapesWorld: every object can be heard, so audio joins images and text on the same scenes.

An object's **pitch** says its colour, its **timbre and rhythm** say its shape, and its **size** sets its
loudness. The eight fundamentals are a chain of perfect fourths (five semitones apart, B3 to A#6, 247 to
1865 Hz): far apart on the mel scale (at least ~1.8 bands of a 64-band log-mel below 1 kHz), and no
fundamental is a harmonic of another (no two lie an octave or a twelfth apart), so a harmonic never
masquerades as another colour. The six shapes are three harmonic profiles (a pure sine, odd harmonics as
in a square wave, all harmonics as in a sawtooth) heard steady or pulsing (4, 6 or 8 pulses a second);
the fundamental is always the strongest partial, so the spectral peak is the colour.

Each object starts at a small random onset, is detuned by up to ``detune`` (so pitch is a band, not a
lookup table), and gets random partial phases; the objects are mixed and noise is added at a given
signal-to-noise ratio. A sound is a pure function of its random generator, computed with array
operations over all samples at once. :meth:`ShapesWorld.sound` draws it from a stream of its own, so
adding sound changes no image, caption or question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..config import field
from .scene import COLOURS, SHAPES, SIZES, Obj, Scene

# Colour -> fundamental in Hz: a chain of perfect fourths (B3, E4, A4, D5, G5, C6, F6, A#6) in equal temperament.
COLOUR_PITCH_HZ: dict[str, float] = {
    colour: round(440.0 * 2 ** ((semitones - 10) / 12), 2) for colour, semitones in zip(COLOURS, range(0, 40, 5))
}


@dataclass(frozen=True)
class Timbre:
    """How a shape sounds: relative amplitudes of harmonics 1, 2, 3, ... and an amplitude rhythm."""

    harmonics: tuple[float, ...]  # amplitude of partial k+1 relative to the fundamental
    pulses_per_second: float  # 0: a steady tone; else raised-cosine pulses at this rate
    description: str


_SINE = (1.0,)
_ODD = tuple(1.0 / k if k % 2 else 0.0 for k in range(1, 10))  # square-wave-like: 1, 0, 1/3, 0, 1/5 ...
_ALL = tuple(1.0 / k for k in range(1, 9))  # sawtooth-like: 1, 1/2, 1/3 ... 1/8
# Shape -> timbre: three harmonic profiles, each heard steady and pulsing (each pulsing one at its own rate).
SHAPE_TIMBRE: dict[str, Timbre] = {
    "circle": Timbre(_SINE, 0.0, "pure sine, steady"),
    "square": Timbre(_ODD, 0.0, "odd harmonics 1/k (square-like), steady"),
    "triangle": Timbre(_ALL, 0.0, "all harmonics 1/k (sawtooth-like), steady"),
    "diamond": Timbre(_SINE, 4.0, "pure sine, 4 pulses a second"),
    "star": Timbre(_ALL, 8.0, "all harmonics 1/k (sawtooth-like), 8 pulses a second"),
    "cross": Timbre(_ODD, 6.0, "odd harmonics 1/k (square-like), 6 pulses a second"),
}
# Size -> peak amplitude of an object's tone: small objects are 6 dB quieter. Three large objects in
# phase stay below full scale before noise; a louder mix is scaled down, never clipped.
SIZE_GAIN: dict[str, float] = {"small": 0.15, "large": 0.3}
_MAX_PARTIALS = max(len(t.harmonics) for t in SHAPE_TIMBRE.values())
_RAMP_SECONDS = 0.01  # fade in and out, so onsets and the clip's end do not click
assert set(COLOUR_PITCH_HZ) == set(COLOURS) and set(SHAPE_TIMBRE) == set(SHAPES) and set(SIZE_GAIN) == set(SIZES)


@dataclass
class SoundConfig:
    """How ShapesWorld sounds are rendered."""

    sample_rate: int = field(16000, "samples per second")
    seconds: float = field(1.0, "length of every sound")
    snr_db: float | None = field(
        10.0,
        "signal-to-noise ratio of the added noise in dB (over the whole clip); None adds none. Each tone "
        "sits in one or two mel bands, so even 0 dB of white noise leaves it well visible; pink noise is harder",
    )
    noise: Literal["white", "pink"] = field("white", "noise spectrum: flat, or 1/f (most power at low pitches)")
    detune: float = field(0.02, "each fundamental is scaled by a random factor in [1 - detune, 1 + detune]")
    max_onset: float = field(0.1, "each object starts at a random time in [0, max_onset] seconds")
    tempo_jitter: float = field(0.05, "pulse rates are scaled by a random factor in [1 - jitter, 1 + jitter]")


def _check(colour: str, shape: str, size: str) -> None:
    for kind, value, known in (("colour", colour, COLOURS), ("shape", shape, SHAPES), ("size", size, SIZES)):
        if value not in known:
            raise ValueError(f"unknown {kind} {value!r}; ShapesWorld sounds know {list(known)}")


def _n_samples(cfg: SoundConfig) -> int:
    n = int(round(cfg.sample_rate * cfg.seconds))
    if n <= 0:
        raise ValueError(f"a sound needs at least one sample; got seconds={cfg.seconds}, sample_rate={cfg.sample_rate}")
    return n


def _tone(colour: str, shape: str, size: str, rng: np.random.Generator, cfg: SoundConfig) -> np.ndarray:
    """One object's clean tone (N,) float64, peak ``SIZE_GAIN[size]``.

    Always draws the same numbers from ``rng`` in the same order (detune, onset, tempo, phases), whatever
    the object, so the stream stays aligned across objects.
    """
    _check(colour, shape, size)
    timbre, sr = SHAPE_TIMBRE[shape], cfg.sample_rate
    f0 = COLOUR_PITCH_HZ[colour] * (1.0 + rng.uniform(-cfg.detune, cfg.detune))
    onset = rng.uniform(0.0, cfg.max_onset)
    rate = timbre.pulses_per_second * (1.0 + rng.uniform(-cfg.tempo_jitter, cfg.tempo_jitter))
    phases = rng.uniform(0.0, 2 * np.pi, size=_MAX_PARTIALS)
    t = np.arange(_n_samples(cfg)) / sr  # (N,)
    k = np.arange(1, len(timbre.harmonics) + 1)  # (K,)
    amps = np.asarray(timbre.harmonics) * (k * f0 < 0.45 * sr)  # band-limited: no partial aliases
    wave = amps @ np.sin(2 * np.pi * f0 * k[:, None] * t[None, :] + phases[: len(k), None])  # (K, N) -> (N,)
    wave /= max(np.abs(wave).max(), 1e-12)
    since = t - onset
    env = np.clip(since / _RAMP_SECONDS, 0.0, 1.0) * np.clip((t[-1] - t) / _RAMP_SECONDS, 0.0, 1.0)
    if rate > 0:
        env = env * np.sin(np.pi * rate * np.maximum(since, 0.0)) ** 2  # pulses of width 1/rate from the onset
    return SIZE_GAIN[size] * env * wave


def _noise(n: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    """(n,) noise of unit power: white, or pink (1/f power) by shaping white noise's spectrum."""
    x = rng.standard_normal(n)
    if kind == "pink":
        spec = np.fft.rfft(x)
        f = np.arange(len(spec), dtype=float)
        f[0] = f[1] if len(f) > 1 else 1.0  # no infinite DC gain
        x = np.fft.irfft(spec / np.sqrt(f), n)
    elif kind != "white":
        raise ValueError(f"unknown noise {kind!r}; choose white or pink")
    return x / max(np.sqrt(np.mean(x**2)), 1e-12)


def _render(objects: Sequence[tuple[str, str, str]], rng: np.random.Generator, cfg: SoundConfig) -> np.ndarray:
    n = _n_samples(cfg)
    mix = np.zeros(n)
    for colour, shape, size in objects:
        mix += _tone(colour, shape, size, rng, cfg)
    if cfg.snr_db is not None:
        power = np.mean(mix**2)
        mix += np.sqrt(power / 10 ** (cfg.snr_db / 10)) * _noise(n, rng, cfg.noise)
    mix /= max(1.0, np.abs(mix).max())  # a rare loud mix is scaled into [-1, 1], not clipped
    return mix.astype(np.float32)


def render_sound(
    objects: Scene | Sequence[Obj], rng: np.random.Generator, cfg: SoundConfig | None = None
) -> np.ndarray:
    """The sound of a scene (or of some objects): every object's tone, mixed, plus noise.

    Args:
        objects: a :class:`Scene`, or its objects (anything with ``colour``, ``shape`` and ``size``).
        rng: the random generator; the same generator state always gives the same sound.
        cfg: how to render; defaults to :class:`SoundConfig`.

    Returns:
        (round(sample_rate * seconds),) float32 mono samples in [-1, 1].
    """
    objs = objects.objects if isinstance(objects, Scene) else objects
    return _render([(o.colour, o.shape, o.size) for o in objs], rng, cfg or SoundConfig())


def render_object_sound(
    colour: str, shape: str, size: str, rng: np.random.Generator, cfg: SoundConfig | None = None
) -> np.ndarray:
    """The sound of one object alone, noise included, without a scene: the same samples as
    :func:`render_sound` gives for a one-object scene with the same generator.

    Fusion tasks pair an image with a sound chosen apart from it (a colour that is only heard, not seen).
    """
    return _render([(colour, shape, size)], rng, cfg or SoundConfig())
