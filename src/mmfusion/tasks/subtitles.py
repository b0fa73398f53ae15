"""A transcript in the formats people use: plain text, one JSON line, SubRip (``.srt``) and WebVTT (``.vtt``)
subtitles."""

from __future__ import annotations

import json

from ..interfaces import Transcript

FORMATS = ("text", "json", "srt", "vtt")
EXTENSIONS = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}


def render(t: Transcript, fmt: str, path: str | None = None) -> str:
    """A transcript as ``text``, ``json`` (one line), ``srt`` or ``vtt``, ending in a newline."""
    if fmt == "text":
        return t.text + "\n"
    if fmt == "json":
        return json.dumps(to_dict(t, path), ensure_ascii=False) + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def to_dict(t: Transcript, path: str | None = None) -> dict:
    d = {"path": path} if path is not None else {}
    d.update(
        text=t.text,
        language=t.language,
        segments=[{"start": s.start, "end": s.end, "text": s.text} for s in t.segments],
    )
    return d


def to_srt(t: Transcript) -> str:
    """SubRip subtitles: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    cues = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_cue_text(s.text)}\n"
        for i, s in enumerate(t.segments, 1)
    ]
    return "\n".join(cues)


def to_vtt(t: Transcript) -> str:
    """WebVTT subtitles: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    cues = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_cue_text(s.text).replace('-->', '->')}\n"
        for s in t.segments
    ]
    return "\n".join(["WEBVTT\n", *cues])


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(text: str) -> str:
    """Cue text without blank lines (a blank line ends a cue in both formats)."""
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip()) or "..."
