"""Options shared by the commands that run a model (classify, caption, ask, transcribe, search...)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

MODEL_HELP = (
    "the model: a native checkpoint directory, hf:<hub-id> (from the Hugging Face cache; set HF_HUB_OFFLINE=1 "
    "to never touch the network) or a directory written by save_pretrained"
)


def add_model_options(p: argparse.ArgumentParser, required: bool = True, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", required=required, help=help)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a CUDA GPU when there is one)")
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="weights' precision (default: fp32 on CPU, "
        "bf16 or fp16 on a GPU)"
    )  # fmt: skip
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "8bit", "4bit"],
        help="int8: dynamic quantisation of linear layers on CPU (any torch model; check what it costs with "
        "`mmfusion quantize`); 8bit/4bit: bitsandbytes on a CUDA GPU (pretrained models)",
    )


def load_model(args: argparse.Namespace):
    """The model named by --model with --device/--dtype/--quantize (--dtype for pretrained models)."""
    from ..backends import load

    kwargs = {k: getattr(args, k) for k in ("dtype", "quantize") if getattr(args, k, None)}
    return load(args.model, device=args.device, **kwargs)


class LazyChoices:
    """argparse ``choices`` made when first needed (checking a value, ``--help``), so that building the parser
    imports nothing heavy: the model registry needs torch, and ``mmfusion serve`` of an ONNX export does not.
    Give the argument a ``metavar``, or argparse lists the choices while building."""

    def __init__(self, make):
        self._make, self._items = make, None

    def _get(self) -> list:
        if self._items is None:
            self._items = list(self._make())
        return self._items

    def __contains__(self, item) -> bool:
        return item in self._get()

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: a whole number of 1 or more, else an argument error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {value}")
    return value


def command(sub, name: str, func, *, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` keeps its examples' line breaks and that runs ``func(args, extra)``."""
    p = sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.set_defaults(func=func)
    return p


class Skipped:
    """Input files a command could not read: each is named on stderr as it is skipped (the run goes on), and
    the count closes the run. ``exit_code()`` is 1 when any was skipped."""

    def __init__(self, kind: str, total: int):
        self.kind, self.total, self.count = kind, total, 0

    def skip(self, path: object, why: object = None) -> None:
        """Name a skipped file; without ``why``, ``path`` is an error whose message names the file and says why."""
        self.count += 1
        print(f"mmfusion: skipped {path}" + (f": {why}" if why is not None else ""), file=sys.stderr)

    def exit_code(self) -> int:
        if self.count:
            print(f"{self.count} of {self.total} {self.kind} could not be read", file=sys.stderr)
        return 1 if self.count else 0


def add_decode_options(p: argparse.ArgumentParser) -> None:
    """How image files are decoded and batched for the model (index, embed)."""
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (default 64)")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=100_000_000,  # data.images.DEFAULT_MAX_PIXELS (not imported: it loads torch)
        help="skip images with more pixels, read from the header before decoding (default 100,000,000)",
    )
    p.add_argument("--full-decode", action="store_true", help="never decode JPEGs at reduced scale")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """--ray and the options of a run on a Ray cluster (index, embed)."""
    g = p.add_argument_group("Ray (pip install 'mmfusion[ray]')")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="decode and embed on Ray: 'local' (the default when the flag is bare) starts Ray on this machine, "
        "'auto' joins the cluster 'ray start' runs here, ray://HOST:10001 connects to a remote one; the images "
        "must be readable at the same paths on every node",
    )
    g.add_argument(
        "--actors",
        type=positive_int,
        help="embedding actors (default: one per GPU, else one per --cpus-per-actor CPUs)",
    )
    g.add_argument("--cpus-per-actor", type=positive_int, default=1, help="CPUs (torch threads) per actor (default 1)")
    g.add_argument("--gpus-per-actor", type=float, help="GPUs per actor, e.g. 0.5 (default: 1 when there are GPUs)")


def ray_options(args: argparse.Namespace):
    """A RayOptions from --ray and its options, or None without --ray (Ray's absence is reported here)."""
    if not getattr(args, "ray", None):
        return None
    from ..config import ConfigError
    from ..index.ray_embed import RayOptions, import_ray

    try:
        import_ray()  # not installed: say how to install it before any work starts
    except ImportError as e:
        raise ConfigError(str(e)) from None
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise ConfigError(f"--gpus-per-actor must be 0 or more, not {args.gpus_per_actor}")
    return RayOptions(
        address=args.ray,
        actors=args.actors,
        batch_size=args.batch_size,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
    )


def listen_socket(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or an error that says what to do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if os.name != "nt":  # as uvicorn does: a port left in TIME_WAIT by the last run is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise RuntimeError(
                f"port {port} on {host} is busy (another mmfusion serve or demo?): choose another with "
                f"--port {port + 1} (make demo PORT={port + 1}), or stop what is using it"
            ) from e
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from e
    return sock
