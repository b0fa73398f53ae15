"""``mmfusion demo`` (``make demo``): ShapesWorld -> a CLIP, a captioner and a VQA model trained on it -> their
evaluations -> an index of the gallery -> the web page on 127.0.0.1, where search, captions and questions all run
on the demo's own models.

Every step reuses what an earlier run left in ``--out``: the exported world, each trained model (a training cut
short resumes from its last checkpoint), the reports and the index (re-indexing unchanged images makes no model
call), so a second run is serving in seconds. The steps themselves are in :mod:`.demo_steps`.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from ..config import ConfigError
from .common import command, listen_socket
from .demo_steps import (
    STAGE_NAMES,
    STAGES,
    STEPS,
    DemoLayout,
    budgets,
    evaluate,
    index_gallery,
    prepare_data,
    prepare_model,
    prepare_videos,
    run_config,
    split_options,
    trained,
)

EXAMPLES = """
examples:
  mmfusion demo                                    # everything under runs/demo/, then http://127.0.0.1:8000/
  mmfusion demo --port 9000
  mmfusion demo --time 20m                         # a longer budget: better captions and answers
  mmfusion demo --no-serve                         # stop after indexing; serve later with the command it prints
  mmfusion demo --train clip                       # the CLIP alone (search and labels), in the whole budget
  mmfusion demo --captioner hf:Salesforce/blip-image-captioning-base   # a pretrained captioner instead

The budget is shared: the CLIP gets 20%, the captioner 40% (its image encoder starts as the CLIP's), the VQA
model 40% (the captioner fine-tuned on questions). A second run reuses the data, the models, the reports and the
index; to train one again, remove its folder (OUT/clip, OUT/caption, OUT/vqa). Options of `mmfusion train` apply
to the CLIP (--train.batch_size=64, --model.vision.layers=3, ...), or to one model with its name in front
(--caption.train.lr=1e-3, --vqa.vqa.caption_share=1.0).
"""


def add_parser(sub) -> None:
    p = command(
        sub,
        "demo",
        cmd_demo,
        help="the whole loop in minutes: generate data, train CLIP + captioner + VQA, evaluate, index, serve the page",
        description="Generate ShapesWorld, train clip-tiny, a captioner and a VQA model on it (or reuse them), "
        "evaluate each, index the gallery (the test split's images) and serve the web page on 127.0.0.1: search, "
        "captions and answers from the demo's own models.",
        epilog=EXAMPLES,
    )
    p.add_argument("--out", default="runs/demo", help="where everything goes (default runs/demo)")
    p.add_argument(
        "--time",
        default="12m",
        help="training budget of all the models together (default 12m; 5m, 20m, ...): 20%% CLIP, 40%% captioner, "
        "40%% VQA",
    )
    p.add_argument(
        "--train",
        metavar="MODELS",
        help=f"which models to train, comma-separated (default {','.join(STAGE_NAMES)}, or clip alone when "
        "--captioner and --answerer are both given); the VQA model is the captioner fine-tuned, so vqa needs caption",
    )
    p.add_argument("--gallery", type=int, default=1000, help="test scenes exported and indexed (default 1000)")
    p.add_argument(
        "--videos",
        type=int,
        default=12,
        help="ShapesWorld videos in the video gallery, indexed beside the images: search finds the moment "
        "(default 12; 0: none; needs PyAV, the [video] extra)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (default 8000; 0: any free one)")
    p.add_argument("--no-serve", action="store_true", help="stop after indexing")
    p.add_argument(
        "--captioner",
        help="serve this captioner instead of the demo's own: a run of mmfusion train caption, or a pretrained "
        "hf:Salesforce/blip-image-captioning-base (from your Hugging Face cache)",
    )
    p.add_argument(
        "--answerer",
        help="serve this answerer instead of the demo's own: a run of mmfusion train vqa, or a pretrained "
        "hf:Qwen/Qwen2.5-VL-3B-Instruct",
    )


def chosen_stages(text: str | None, captioner: str | None = None, answerer: str | None = None):
    """The stages ``--train`` names (default: all, or the CLIP alone when both generators are given), in
    training order, checked."""
    if text is None:
        text = "clip" if captioner and answerer else ",".join(STAGE_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        raise ConfigError(f"--train {text!r}: choose from {', '.join(STAGE_NAMES)} (comma-separated)")
    if "clip" not in names:
        raise ConfigError("--train: the demo's search needs its CLIP; keep clip in the list")
    if "vqa" in names and "caption" not in names:
        raise ConfigError("--train: the VQA model is the captioner fine-tuned on questions; add caption")
    return [s for s in STAGES if s.name in names]


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    """Generate, train (or reuse), evaluate, index, serve; each step says what it did and where."""
    if args.gallery < 1:
        raise ValueError(f"--gallery must be at least 1, got {args.gallery}")
    if args.videos < 0:
        raise ValueError(f"--videos must be 0 or more, got {args.videos}")
    where = DemoLayout(Path(args.out))
    stages = chosen_stages(args.train, args.captioner, args.answerer)
    if not args.no_serve:
        listen_socket(args.port).close()  # a busy port fails now, not after minutes of training
    from ..train.config import parse_duration

    progress = not args.quiet
    seconds = budgets(parse_duration(args.time), stages)
    options = split_options(extra)
    # every option checked now, not after the export or another model's training
    configs = {s.name: run_config(where, s, seconds[s.name], progress, options[s.name]) for s in stages}
    share = ", ".join(f"{s.name} {configs[s.name].train.time}" for s in stages)
    print(f"        budget {args.time}: {share}")
    prepare_data(where, args.gallery, progress)
    videos = prepare_videos(where, args.videos, progress)
    fresh = set()
    for step, s in zip((2, 3, 4), stages, strict=False):
        if s.start_from and not trained(where, s.start_from):
            raise RuntimeError(f"the {s.what} starts from {where.run_of(s.start_from)}, which is not trained")
        if prepare_model(where, s, configs[s.name], step):
            fresh.add(s.name)
    for step, name in ((3, "caption"), (4, "vqa")):
        if name not in configs:
            print(f"[{step}/{STEPS}] not training the {name} model (--train {','.join(configs)})")
    evaluate(where, args.gallery, fresh, [s.name for s in stages])
    index_gallery(where, progress, videos)
    captioner = args.captioner or (str(where.run_of("caption")) if "caption" in configs else None)
    answerer = args.answerer or (str(where.run_of("vqa")) if "vqa" in configs else None)
    if args.no_serve:
        flags = "".join(f" --{k} {v}" for k, v in (("captioner", captioner), ("answerer", answerer)) if v)
        print(f"[{STEPS}/{STEPS}] not serving (--no-serve); serve it with: mmfusion serve --db {where.index}{flags}")
        return 0
    return serve(where, args, captioner, answerer)


def serve(where: DemoLayout, args: argparse.Namespace, captioner: str | None, answerer: str | None) -> int:
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
        captioner=captioner,
        answerer=answerer,
    )
    print(f"[{STEPS}/{STEPS}] serving the web page (loading the models and the index)", flush=True)
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
