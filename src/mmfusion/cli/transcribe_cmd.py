"""``mmfusion transcribe``: speech to text with timestamps (Whisper), as text, JSON or subtitles."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..config import ConfigError
from ..interfaces import GenerationOptions
from ..tasks.subtitles import EXTENSIONS, FORMATS, render
from .common import Skipped, add_model_options, command

EXAMPLES_TRANSCRIBE = """
examples:
  mmfusion transcribe talk.mp3 --model hf:openai/whisper-small
  mmfusion transcribe talk.mp3 --model hf:openai/whisper-small --format srt > talk.srt
  mmfusion transcribe a.wav b.flac --model hf:openai/whisper-small --format vtt --out-dir subtitles/
  mmfusion transcribe rede.ogg --model hf:openai/whisper-small --language de --task translate
  mmfusion transcribe *.wav --model hf:openai/whisper-small --format json > transcripts.jsonl

Formats: text (the transcript), json (one object per file and line: path, text, language, segments with
start/end in seconds), srt and vtt (subtitles, one cue per segment). With several files, text, srt and vtt
output on stdout is headed '==> FILE <=='; --out-dir writes one file per input instead. Audio of any length
works (over 30 s it is decoded window by window). Files that cannot be read as audio are reported on stderr
(exit status 1); the others are still transcribed. WAV, FLAC, OGG and MP3 are read directly; convert other
formats first: ffmpeg -i in.m4a -ac 1 -ar 16000 out.wav
"""


def add_parser(sub) -> None:
    t = command(
        sub,
        "transcribe",
        cmd_transcribe,
        help="speech to text with timestamps (Whisper)",
        description="Transcribe (or translate to English) the speech in each AUDIO file with a speech-to-text "
        "model (a Whisper model such as hf:openai/whisper-small).",
        epilog=EXAMPLES_TRANSCRIBE,
    )
    t.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (wav, flac, ogg, mp3...)")
    add_model_options(t)
    t.add_argument("--language", help="the spoken language, as a code or name (de, german); default: detected")
    t.add_argument(
        "--task",
        choices=["transcribe", "translate"],
        default="transcribe",
        help="transcribe (text in the spoken language, the default) or translate (English text)",
    )
    t.add_argument("--no-timestamps", action="store_true", help="no segment times: one segment per file")
    t.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    t.add_argument("--out-dir", help="write FILE's transcript to OUT_DIR/<name>.<txt|json|srt|vtt> instead of stdout")
    t.add_argument("--max-new-tokens", type=int, help="most tokens per 30-second window (default: the model's, 224)")
    t.add_argument("--beams", type=int, help="beam search with this many beams (default 1: greedy)")


def cmd_transcribe(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.audio import AudioDecodeError
    from ..interfaces import Transcriber
    from .common import load_model

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion transcribe --help")
    options = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.beams)) if v is not None}
    GenerationOptions(**options)  # ValueError now for --beams 0, before a model is loaded
    skipped = Skipped("audio files", len(args.audio))
    paths = []
    for path in args.audio:
        if Path(path).is_file():
            paths.append(path)
        else:
            skipped.skip(path, "is a directory" if Path(path).is_dir() else "file not found")
    if not paths:
        print("no audio file could be read", file=sys.stderr)
        return 1
    model = load_model(args)
    if not isinstance(model, Transcriber):
        raise ValueError(_not_a_transcriber(model))
    if args.language and hasattr(model, "normalize_language"):
        model.normalize_language(args.language)  # an unknown language fails before any file is read
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    headed = len(args.audio) > 1 and out_dir is None and args.format != "json"
    with _quiet_transformers(getattr(args, "verbose", False)):
        for path in paths:
            try:
                transcript = model.transcribe(
                    path, language=args.language, task=args.task, timestamps=not args.no_timestamps, **options
                )
            except AudioDecodeError as e:  # its message names the file and the reason
                skipped.skip(e)
                continue
            text = render(transcript, args.format, path)
            if out_dir is not None:
                dest = _destination(out_dir, path, args.format, used)
                dest.write_text(text, encoding="utf-8")
                print(f"{path} -> {dest}", flush=True)
            elif headed:
                print(f"==> {path} <==\n{text.rstrip()}\n", flush=True)
            else:
                print(text.rstrip("\n"), flush=True)
    return skipped.exit_code()


# ---- helpers -----------------------------------------------------------------------------------------


def _destination(out_dir: Path, path: str, fmt: str, used: set[str]) -> Path:
    """OUT_DIR/<stem>.<ext>, numbered (<stem>-2.<ext>) when two inputs share a name."""
    stem, n = Path(path).stem, 1
    name = stem
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return out_dir / f"{name}{EXTENSIONS[fmt]}"


def _not_a_transcriber(model) -> str:
    from ..interfaces import Answerer, Captioner, Embedder

    kind = getattr(model, "model_type", None) or getattr(model, "family", None) or type(model).__name__
    name = getattr(model, "name", None) or "the model"
    what = next((i.__name__ for i in (Embedder, Captioner, Answerer) if isinstance(model, i)), None)
    article = "an" if what and what[0] in "AEIOU" else "a"
    role = f" ({article} {what})" if what else ""
    return (
        f"{name} is a {str(kind).upper()} model{role}; transcribe needs a speech-to-text model: Whisper "
        "(e.g. hf:openai/whisper-small)"
    )


@contextlib.contextmanager
def _quiet_transformers(verbose: bool):
    """transformers' per-call generation notices (max_length vs max_new_tokens...) off, unless -v."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    if verbose:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
