"""``mmfusion demo`` (``make demo``): ShapesWorld -> a trained clip-tiny -> its evaluation -> an index of the
gallery -> the web page on 127.0.0.1.

Every step reuses what an earlier run left in ``--out``: the exported world, the trained model (a training cut
short resumes from its last checkpoint), the reports and the index (re-indexing unchanged images makes no model
call), so a second run is serving in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import command

if TYPE_CHECKING:
    from ..train import RunConfig

STEPS = 5

EXAMPLES = """
examples:
  mmfusion demo                                    # everything under runs/demo/, then http://127.0.0.1:8000/
  mmfusion demo --port 9000
  mmfusion demo --no-serve                         # stop after indexing; serve later with mmfusion serve --db ...
  mmfusion demo --captioner hf:Salesforce/blip-image-captioning-base   # captions on the page (from your HF cache)

A second run reuses the data, the model, the reports and the index. To train again, remove OUT/clip.
Training options of `mmfusion train` apply too (--train.batch_size=64, --model.vision.layers=3, ...).
"""


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo keeps each thing under ``--out``."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "shapesworld"

    @property
    def run(self) -> Path:
        return self.out / "clip"

    @property
    def eval(self) -> Path:
        return self.run / "eval"

    @property
    def index(self) -> Path:
        return self.out / "index"

    @property
    def gallery(self) -> Path:
        return self.data / "test" / "images"


def add_parser(sub) -> None:
    p = command(
        sub,
        "demo",
        cmd_demo,
        help="the whole loop in a few minutes: generate data, train, evaluate, index, serve the web page",
        description="Generate ShapesWorld, train clip-tiny (or reuse it), evaluate it, index the gallery (the test "
        "split's images) and serve the web page on 127.0.0.1.",
        epilog=EXAMPLES,
    )
    p.add_argument("--out", default="runs/demo", help="where everything goes (default runs/demo)")
    p.add_argument("--time", default="2m30s", help="training budget (default 2m30s; 90s, 5m, ...)")
    p.add_argument("--gallery", type=int, default=1000, help="test scenes exported and indexed (default 1000)")
    p.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (default 8000; 0: any free one)")
    p.add_argument("--no-serve", action="store_true", help="stop after indexing")
    p.add_argument(
        "--captioner",
        help="a Captioner for the page's captions, e.g. hf:Salesforce/blip-image-captioning-base (pretrained, from "
        "your Hugging Face cache; captioners trained by mmfusion come in a later release)",
    )
    p.add_argument(
        "--answerer",
        help="an Answerer for questions about images, e.g. hf:Qwen/Qwen2.5-VL-3B-Instruct (pretrained; trainable "
        "native ones come in a later release)",
    )


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    """Generate, train (or reuse), evaluate, index, serve; each step says what it did and where."""
    if args.gallery < 1:
        raise ValueError(f"--gallery must be at least 1, got {args.gallery}")
    where = DemoLayout(Path(args.out))
    if not args.no_serve:
        listen_socket(args.port).close()  # a busy port fails now, not after minutes of training
    progress = not args.quiet
    cfg = run_config(where, args.time, progress, extra)  # a bad option fails now, not after the export
    prepare_data(where, args.gallery, progress)
    trained = prepare_model(where, cfg)
    evaluate(where, args.gallery, fresh=trained)
    index_gallery(where, progress)
    if args.no_serve:
        print(f"[5/{STEPS}] not serving (--no-serve); serve it with: mmfusion serve --db {where.index}")
        return 0
    return serve(where, args)


# ---- the steps ------------------------------------------------------------------------------------------


def world_counts(gallery: int) -> tuple[dict[str, int], int]:
    """Scenes per split and zero-shot images per class: 1000 test scenes -> 500 held-out and 20 per class."""
    return {"test": gallery, "heldout": max(1, gallery // 2)}, max(1, min(20, gallery // 50))


def prepare_data(where: DemoLayout, gallery: int, progress: bool) -> None:
    """Export ShapesWorld unless the same export is there."""
    from ..data.export import export_shapes
    from ..data.shapes import ShapesWorld

    world = ShapesWorld()
    counts, per_class = world_counts(gallery)
    meta = where.data / "world.json"
    if meta.is_file():
        stored = json.loads(meta.read_text())
        if stored.get("counts") == counts and stored.get("config") == json.loads(json.dumps(asdict(world.cfg))):
            print(f"[1/{STEPS}] reusing ShapesWorld in {where.data} ({gallery} gallery images)")
            return
        meta.unlink()  # written last by an export: an export cut short below is never taken for a whole one
    print(f"[1/{STEPS}] generating ShapesWorld in {where.data}: {gallery} gallery (test) scenes, "
          f"{counts['heldout']} held-out, {per_class} zero-shot images per class", flush=True)  # fmt: skip
    export_shapes(world, where.data, counts, per_class, progress=progress)


def run_config(where: DemoLayout, budget: str, progress: bool, extra: list[str]) -> RunConfig:
    """clip-tiny on the ShapesWorld stream for ``budget``, with the options of ``mmfusion train`` in ``extra``;
    a training cut short keeps the options it was started with (the model it resumes has their shape)."""
    from ..config import deep_update, from_dict, with_overrides
    from ..train import RunConfig
    from ..train.checkpoint import latest_checkpoint, read_state

    ckpt = latest_checkpoint(where.run / "checkpoints")
    data = read_state(ckpt)["run"] if ckpt is not None else {"preset": "clip-tiny"}
    length = {"steps": None, "epochs": None, "time": budget}
    data = deep_update(data, {"out": str(where.run), "train": {**length, "progress": progress}})
    cfg = from_dict(RunConfig, with_overrides(data, extra))  # --train.batch_size=64, --model.vision.layers=3, ...
    cfg.model_config()  # a bad model override fails now, not after the data is made
    return cfg


def prepare_model(where: DemoLayout, cfg: RunConfig) -> bool:
    """Train as ``cfg`` says, resume a training cut short, or reuse a finished model. True if it trained."""
    from ..train import train
    from ..train.checkpoint import latest_checkpoint

    if (where.run / "model" / "config.json").is_file():
        print(f"[2/{STEPS}] reusing the trained model in {where.run / 'model'} (remove {where.run} to train again)")
        return False
    ckpt = latest_checkpoint(where.run / "checkpoints")
    if ckpt is None:
        print(f"[2/{STEPS}] training {cfg.preset} on the ShapesWorld stream for {cfg.train.time} (progress below)",
              flush=True)  # fmt: skip
    else:
        print(f"[2/{STEPS}] resuming the training cut short at {ckpt.name} in {where.run} (budget {cfg.train.time})")
    try:
        result = train(cfg, resume=ckpt is not None)
    except KeyboardInterrupt:
        last = latest_checkpoint(where.run / "checkpoints")
        raise KeyboardInterrupt(
            f"training stopped{f' at {last.name}' if last else ''}; run the demo again (same --out) to continue"
        ) from None
    print(f"        trained {result.steps} steps in {result.elapsed_s:.0f}s: {where.run / 'model'}")
    return True


def evaluate(where: DemoLayout, gallery: int, fresh: bool) -> None:
    """Retrieval over the gallery and zero-shot classes; the stored reports are shown again for a reused model."""
    from ..eval.report import evaluate_retrieval, evaluate_zeroshot, summary_lines, write_report

    paths = {name: where.eval / f"{name}.json" for name in ("retrieval", "zeroshot")}
    if not fresh and all(p.is_file() for p in paths.values()) and _ranked(paths["retrieval"]) == gallery:
        print(f"[3/{STEPS}] the model's reports, from {where.eval}")
        for p in paths.values():
            print("\n".join(summary_lines(json.loads(p.read_text()))))
        return
    from ..backends import load

    print(f"[3/{STEPS}] evaluating on the gallery (retrieval) and the zero-shot classes", flush=True)
    model, data = load(where.run), str(where.data)
    for name, run in (
        ("retrieval", lambda: evaluate_retrieval(model, data, n=gallery, out=where.eval, progress=False)),
        ("zeroshot", lambda: evaluate_zeroshot(model, data, out=where.eval, progress=False)),
    ):
        report = run()
        write_report(report, paths[name])
        print("\n".join(summary_lines(report)))
    print(f"        reports: {paths['retrieval']}, {paths['zeroshot']}")
    print(f"        training curves: {where.run / 'plots' / 'training.png'}")


def _ranked(report: Path) -> int | None:
    """How many images a stored retrieval report ranked (a report of another gallery size is redone)."""
    try:
        return json.loads(report.read_text()).get("n_images")
    except (OSError, ValueError):
        return None


def index_gallery(where: DemoLayout, progress: bool) -> None:
    """Bring the index up to date with the gallery; unchanged images cost a ``stat``, no model call."""
    from ..index import Index, IndexMismatchError

    print(f"[4/{STEPS}] indexing {where.gallery} into {where.index}", flush=True)
    try:
        ix = Index.open(where.index, model=str(where.run), write=True)
    except IndexMismatchError:  # the model was trained again since: this index is the demo's own, rebuild it
        print(f"        the model changed since {where.index} was built: building it again")
        shutil.rmtree(where.index)
        ix = Index.open(where.index, model=str(where.run), write=True)
    with ix:
        report = ix.update([where.gallery], progress=progress)
        images = ix.store.count()
    for line in report.summary():
        print(f"        {line}")
    print(f"        {images} images in the index")


def serve(where: DemoLayout, args: argparse.Namespace) -> int:
    """The service with the web page on 127.0.0.1, until Ctrl-C."""
    import uvicorn

    from ..data.shapes import ShapesWorld
    from ..serve.app import create_app
    from ..serve.settings import ServeSettings

    sock = listen_socket(args.port)
    port = sock.getsockname()[1]
    settings = ServeSettings(
        db=str(where.index),
        labels=ShapesWorld().combos("all"),  # the zero-shot classes: "red circle", ...
        host="127.0.0.1",
        port=port,
        captioner=args.captioner,
        answerer=args.answerer,
    )
    print(f"[5/{STEPS}] serving the web page (loading {where.run.name} and the index)", flush=True)
    app = create_app(settings)  # the model and the index load when the server starts
    url = f"http://127.0.0.1:{port}/"
    bar = "=" * (len(url) + 10)
    print(f"\n{bar}\n    open {url}\n{bar}\nAPI docs at {url}docs; Ctrl-C stops the service.\n", flush=True)
    level = "info" if args.verbose else "warning"
    server = uvicorn.Server(uvicorn.Config(app, log_level=level))
    try:
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down on Ctrl-C, then raises it again
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # the start-up failed (the model or the index could not load): uvicorn logged why
        raise RuntimeError("the service did not start; the error is above")
    print("stopped; run the demo again to serve the same index in seconds")
    return 0


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
