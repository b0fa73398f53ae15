"""The ``mmfusion`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module with an ``add_parser(sub)``; this module assembles them in the order
``--help`` lists them (importing only the one that runs) and turns errors into one line that names the fix.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..config import ConfigError

log = logging.getLogger("mmfusion")

# command -> the module that defines it, in the order --help lists them; a module is imported when its command
# runs (or for --help), so that `mmfusion serve` of an ONNX export imports no torch and every command starts quickly
COMMANDS = {
    "data": "data_cmd", "train": "train_cmd", "eval": "eval_cmd", "index": "index_cmds", "search": "index_cmds",
    "embed": "embed_cmd", "transcribe": "transcribe_cmd", "ask": "ask_cmd", "serve": "serve_cmd",
    "worker": "worker_cmd", "bench": "bench_cmd", "classify": "classify_cmd", "caption": "caption_cmd",
    "models": "models_cmd", "demo": "demo_cmd", "export": "export_cmd", "quantize": "quantize_cmd",
    "distill": "compress_cmd", "prune": "compress_cmd", "run": "run_cmd",
}  # fmt: skip


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of command ``only`` alone (what :func:`main` builds to run one)."""
    p = argparse.ArgumentParser(
        prog="mmfusion",
        description="Align, fuse, search and answer across images, text, "
        "audio and video: train, measure and use multimodal models.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[only]] if only in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(f".{name}", __package__).add_parser(sub)
    return p


def _command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(only=_command(sys.argv[1:] if argv is None else list(argv)))
    args, extra = parser.parse_known_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command as given (train --nproc re-runs it)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args, extra)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mmfusion: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
