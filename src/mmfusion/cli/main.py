"""The ``mmfusion`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module with an ``add_parser(sub)``; this module assembles them in the order
``--help`` lists them and turns errors into one line that names the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import ConfigError
from . import (
    ask_cmd,
    bench_cmd,
    caption_cmd,
    classify_cmd,
    data_cmd,
    demo_cmd,
    embed_cmd,
    eval_cmd,
    export_cmd,
    index_cmds,
    models_cmd,
    quantize_cmd,
    serve_cmd,
    train_cmd,
    transcribe_cmd,
)

log = logging.getLogger("mmfusion")

# in the order --help lists them
COMMANDS = (
    data_cmd, train_cmd, eval_cmd, index_cmds, embed_cmd, transcribe_cmd, ask_cmd, serve_cmd, bench_cmd, classify_cmd,
    caption_cmd, models_cmd, demo_cmd, export_cmd, quantize_cmd,
)  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmfusion",
        description="Align, fuse, search and answer across images, text, "
        "audio and video: train, measure and use multimodal models.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
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
