"""The ``mmfusion`` command: a thin layer that parses configs and calls the library.

Every training option is a field of :class:`mmfusion.train.RunConfig`; give it in a YAML file
(``--config run.yaml``) or on the command line as ``--train.lr=1e-3`` / ``--model.vision.layers=3``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import ConfigError, format_help, from_dict, load_yaml, merge, parse_override
from .common import add_model_options, load_model

log = logging.getLogger("mmfusion")

EXAMPLES_TRAIN = """
examples:
  mmfusion train clip --out runs/clip --time 3m
  mmfusion train clip --data my_photos/ --preset clip-tiny --epochs 10 --train.lr=5e-4
  mmfusion train clip --config run.yaml --model.vision.layers=3 --train.loss=siglip
  mmfusion train clip --out runs/clip --time 3m --resume      # continue an interrupted run
  mmfusion train fusion --strategy attention --epochs 8       # ShapesWorld image + sound (complementary task)
  mmfusion train fusion --strategy late --fusion.task=correspondence --epochs 8 --out runs/late
  mmfusion train fusion --data clips.npz --strategy cross_attention --epochs 30 --model.modality_dropout=0.3
  mmfusion train caption --time 10m                           # the caption-tiny captioner on ShapesWorld
  mmfusion train caption --init.from_clip=runs/clip --init.freeze_vision=true --time 5m
  mmfusion train vqa --time 10m                               # the vqa-tiny answerer on ShapesWorld questions
  mmfusion train vqa --preset caption-tiny --init.from_clip=runs/clip --time 10m   # answers generated
  mmfusion train video --time 3m                              # TimeSformer (video-tiny) on ShapesWorld actions
  mmfusion train video --model.encoder.attention=pool --time 3m --out runs/video-pool   # frame-pooling baseline
  mmfusion train video --data runs/video-data --epochs 30     # video files + labels.jsonl (data shapes --video)

every option (YAML keys have the same dotted names):
"""


def _overrides(extra: list[str]) -> list[str]:
    """``--a.b=v`` and ``--a.b v`` from argparse's leftovers, as ``a.b=v``."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise ConfigError(
                f"unrecognised argument {tok!r}; config options look like --train.lr=1e-3 (see --help for the list)"
            )
        if "=" in tok:
            out.append(tok[2:])
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{tok[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"{tok} needs a value, like {tok}=VALUE")
    return out


def _deep_update(base: dict, new: dict) -> dict:
    """Merge ``new`` into ``base``, nested mappings key by key."""
    for k, v in new.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def build_run_config(args: argparse.Namespace, extra: list[str]):
    """Defaults <- stored run (with --resume) <- YAML file <- named flags <- dotted overrides."""
    from ..train import RunConfig
    from ..train.checkpoint import latest_checkpoint, read_state

    data: dict[str, Any] = {}
    if args.resume and args.out:
        ckpt = latest_checkpoint(Path(args.out) / "checkpoints")
        if ckpt is not None:
            data = read_state(ckpt)["run"]
    if args.config:
        data = _deep_update(data, load_yaml(args.config))
    task_presets = {"fusion": "fusion-small", "caption": "caption-tiny", "vqa": "vqa-tiny", "video": "video-tiny"}
    preset = args.preset or (None if data.get("preset") else task_presets.get(args.task))
    named = {"data": {"source": args.data} if args.data else {}, "preset": preset, "out": args.out}
    if getattr(args, "strategy", None):
        if args.task != "fusion":
            raise ConfigError("--strategy is for `mmfusion train fusion`")
        named["model"] = {"strategy": args.strategy}
    length = {k: getattr(args, k) for k in ("steps", "epochs", "time") if getattr(args, k) is not None}
    if length:  # one length replaces the others (a resumed run may be extended)
        named["train"] = {"steps": None, "epochs": None, "time": None, **length}
    data = _deep_update(data, {k: v for k, v in named.items() if v})
    for text in _overrides(extra):
        data = _deep_update(data, parse_override(text))
    data["task"] = args.task
    if args.task in task_presets and not data.get("out"):
        data["out"] = f"runs/{args.task}"
    cfg = from_dict(RunConfig, data)
    from ..models.registry import model_config

    model_config(cfg.preset, cfg.model)  # fail now, not after loading data, on a bad model override
    return cfg


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..train import train

    cfg = build_run_config(args, extra)
    result = train(cfg, resume=args.resume)
    print(f"trained {result.steps} steps ({result.samples:,} samples) in {result.elapsed_s:.0f}s")
    print(f"model:   {result.out / 'model'}   (mmfusion.load('{result.out}'))")
    print(f"metrics: {result.out / 'metrics.jsonl'}")
    print(f"plot:    {result.out / 'plots' / 'training.png'}")
    if cfg.task == "caption":
        print(f"try:     mmfusion caption --model {result.out} IMAGE...")
    if cfg.task == "vqa":
        print(f"try:     mmfusion ask --model {result.out} IMAGE 'what colour is the circle?'")
    if cfg.task == "video" and result.report is not None:
        m, n = result.report["metrics"], result.report["n"]
        directions = f", directions {m['direction_accuracy']:.3f}" if "direction_accuracy" in m else ""
        print(f"held-out: top-1 {m['top1']:.3f}, top-5 {m['top5']:.3f}{directions} on {n} clips")
        print(f"report:  {result.out / 'eval' / 'video.json'}, {result.out / 'eval' / 'confusion.png'}")
    elif result.report is not None:
        m = result.report["metrics"]
        print(f"held-out: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} on {result.report['n']} examples")
        for mod, mm in result.report.get("missing_modality", {}).items():
            print(f"  without {mod}: accuracy {mm['accuracy']:.3f}")
        print(f"report:  {result.out / 'eval' / 'fusion.json'}, {result.out / 'eval' / 'confusion.png'}")
    return 0


def _eval_out(model_path: str, out: str | None) -> Path:
    if out:
        return Path(out)
    if model_path.startswith("hf:") and not Path(model_path[3:]).expanduser().is_dir():
        return Path("runs") / "eval" / re.sub(r"[^A-Za-z0-9._-]+", "_", model_path[3:])  # a hub id
    p = Path(model_path.removeprefix("hf:")).expanduser()
    return (p / "eval") if (p / "model").is_dir() else p.parent / f"{p.name}-eval"


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:

    from ..eval.report import evaluate_retrieval, evaluate_zeroshot, summary_lines, write_report

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion eval --help")
    model = load_model(args)
    out = _eval_out(args.model, args.out)
    if args.kind == "fusion" or getattr(model, "family", None) == "fusion":
        return _eval_fusion(model, args, out)
    if args.kind in ("caption", "vqa"):
        return _eval_generation(model, args, out)
    kinds = ["retrieval", "zeroshot"] if args.kind == "all" else [args.kind]
    templates = None
    if args.templates:
        p = Path(args.templates)
        templates = (
            [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            if p.is_file()
            else [t.strip() for t in args.templates.split("|") if t.strip()]
        )
    for kind in kinds:
        if kind == "retrieval":
            report = evaluate_retrieval(model, args.data, n=args.n, split=args.split, out=out, progress=not args.quiet)
        else:
            report = evaluate_zeroshot(
                model, args.data, per_class=args.per_class, templates=templates, out=out, progress=not args.quiet
            )
        path = (
            Path(args.json)
            if args.json and len(kinds) == 1
            else (
                Path(args.json).with_name(f"{Path(args.json).stem}_{kind}.json") if args.json else out / f"{kind}.json"
            )
        )
        write_report(report, path)
        print("\n".join(summary_lines(report)))
        print(f"  report: {path}")
    return 0


def _eval_generation(model, args: argparse.Namespace, out: Path) -> int:
    """A captioner (BLEU, CIDEr, attribute accuracy) or an answerer (VQA accuracy per question type)."""
    from ..interfaces import Answerer, Captioner

    if args.kind == "caption":
        from ..eval.captioning import evaluate_captioner, summary_lines

        if not isinstance(model, Captioner):
            raise ValueError(f"{args.model} does not caption images; `eval caption` needs a captioner")
        report = evaluate_captioner(model, args.data, n=args.n, out=out, split=args.split)
        name = "captioning"
    else:
        from ..eval.vqa import evaluate_answerer, summary_lines

        if not isinstance(model, Answerer):
            raise ValueError(f"{args.model} does not answer questions; `eval vqa` needs an answerer")
        report = evaluate_answerer(model, args.data, n=args.n, out=out, split=args.split)
        name = "vqa"
    if args.json:
        from ..eval.report import write_report

        write_report(report, Path(args.json))
    print("\n".join(summary_lines(report)))
    print(f"  report: {args.json or out / (name + '.json')}, plots in {out}")
    return 0


def _eval_fusion(model, args: argparse.Namespace, out: Path) -> int:
    """A fusion classifier on the held-out split it was trained beside, or on every example of --data FILE."""
    from ..data.features import load_feature_file
    from ..eval.classification import evaluate_fusion
    from ..train.fusion_task import rebuild_test_data

    if getattr(model, "family", None) != "fusion":
        raise ValueError(f"{args.model} is not a fusion classifier; `eval fusion` needs one (mmfusion train fusion)")
    if args.data and args.data != "shapes":
        data = load_feature_file(args.data)
        names = list(model.cfg.class_names)
        if names and data.class_names != names:
            raise ValueError(f"{args.data} has classes {data.class_names}, the model {names}: they must be the same")
        where = args.data
    else:
        trained_on = (getattr(model, "meta", None) or {}).get("trained_on")
        if not trained_on:
            raise ValueError(f"{args.model} does not record its data; give the examples with --data FILE.npz")
        data, where = rebuild_test_data(trained_on), "its held-out split"
    report = evaluate_fusion(model, data, out)
    m = report["metrics"]
    print(f"{model.cfg.strategy} fusion on {where} ({report['n']} examples): accuracy {m['accuracy']:.3f}, "
          f"macro-F1 {m['macro_f1']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}")  # fmt: skip
    for mod, mm in report["missing_modality"].items():
        print(f"  without {mod}: accuracy {mm['accuracy']:.3f}")
    print(f"  report: {out / 'fusion.json'}, {out / 'confusion.png'}")
    return 0


def _data_video(args: argparse.Namespace, extra: list[str]) -> int:
    """`mmfusion data shapes --video`: ShapesWorld clips as MP4 files + labels.jsonl per split."""
    from ..data.video import ShapesVideo, ShapesVideoConfig, export_videos

    cfg = ShapesVideoConfig()
    for text in _overrides(extra):
        override = parse_override(text)
        if "video" not in override:
            raise ConfigError(f"unknown option {text!r}; with --video, options look like --video.frames=16")
        cfg = merge(cfg, override["video"], prefix="video.")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    out = export_videos(ShapesVideo(cfg), args.out, counts, progress=not args.quiet)
    print(
        f"ShapesWorld video written to {out}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        + f" clips of {cfg.frames} frames at {cfg.image_size} px; train with: mmfusion train video --data {out}"
    )
    return 0


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    if args.video:
        return _data_video(args, extra)
    from ..data.export import export_shapes
    from ..data.shapes import ShapesConfig, ShapesWorld
    from ..data.sound import SoundConfig

    cfg, sound = ShapesConfig(), SoundConfig()
    for text in _overrides(extra):
        override = parse_override(text)
        if "shapes" in override:
            cfg = merge(cfg, override["shapes"], prefix="shapes.")
        elif "sound" in override and args.sounds:
            sound = merge(sound, override["sound"], prefix="sound.")
        else:
            raise ConfigError(
                f"unknown option {text!r}; world options look like --shapes.seed=1, "
                "sound options (with --sounds) like --sound.snr_db=5"
            )
    counts = {"train": args.train, "val": args.val, "test": args.test, "heldout": args.heldout}
    out = export_shapes(
        ShapesWorld(cfg),
        args.out,
        counts,
        args.zeroshot_per_class,
        progress=not args.quiet,
        sound=sound if args.sounds else None,
    )
    print(
        f"ShapesWorld written to {out}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        + (f", zeroshot {args.zeroshot_per_class} per class" if args.zeroshot_per_class else "")
        + (f", with sounds ({sound.seconds:g} s at {sound.sample_rate} Hz)" if args.sounds else "")
    )
    if args.train and cfg.curriculum:
        print(
            f"the train split starts with the curriculum: scenes 0-{cfg.curriculum - 1} hold one object, the next "
            f"{cfg.curriculum} ramp to the full mix (read in this order first; --shapes.curriculum=0 for none)"
        )
    return 0


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    from ..models.registry import describe_models, model_config

    for name, family, desc in describe_models():
        _, cfg = model_config(name)
        print(f"{name:12s} {family:6s} {desc}")
        if args.verbose:
            print("   ", asdict(cfg))
    return 0


def _train_options_help() -> str:
    from ..models.registry import model_config
    from ..train import RunConfig

    run = "\n".join(line for line in format_help(RunConfig()).splitlines() if not line.lstrip().startswith("--model="))
    _, tiny = model_config("clip-tiny")
    return (
        run
        + "\n\nmodel options (override the preset; defaults shown are clip-tiny's):\n"
        + format_help(tiny, prefix="model.")
    )


def make_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        prog="mmfusion",
        description="Align, fuse, search and answer across images, text, "
        "audio and video: train, measure and use multimodal models.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "data",
        help="generate datasets (ShapesWorld) on disk",
        description="Write ShapesWorld in the on-disk formats: images/ + captions.jsonl, scenes.jsonl "
        "and qa.jsonl per split, and zero-shot class folders. World options: "
        "--shapes.seed, --shapes.image_size, --shapes.heldout, ...",
    )
    d.add_argument("what", choices=["shapes"], help="which dataset")
    d.add_argument("--out", required=True, help="destination folder")
    d.add_argument("--train", type=int, default=20000, help="training scenes (default 20000)")
    d.add_argument("--val", type=int, default=0, help="validation scenes (default 0)")
    d.add_argument("--test", type=int, default=1000, help="test scenes (default 1000)")
    d.add_argument("--heldout", type=int, default=1000, help="scenes with held-out shape-colour combinations")
    d.add_argument("--zeroshot-per-class", type=int, default=50, help="zero-shot images per class (0: none)")
    d.add_argument(
        "--sounds",
        action="store_true",
        help="also write each scene's sound, <split>/sounds/*.wav (pitch = colour, timbre and rhythm = shape); "
        "sound options like --sound.snr_db=5, --sound.seconds=2",
    )
    d.add_argument(
        "--video",
        action="store_true",
        help="write video clips instead of images: <split>/video/*.mp4 + <split>/labels.jsonl, one object moving "
        "left/right/up/down, growing, shrinking or rotating (needs mmfusion[video]); --train/--val/--test "
        "count clips; options like --video.frames=16, --video.image_size=64",
    )
    d.set_defaults(func=cmd_data)

    t = sub.add_parser(
        "train",
        help="train a model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model. Length: exactly one of --steps, --epochs, --time.",
        epilog=EXAMPLES_TRAIN + _train_options_help(),
    )
    t.add_argument("task", choices=["clip", "fusion", "caption", "vqa", "video"], help="what to train")
    t.add_argument("--config", help="YAML file with any of the options below")
    t.add_argument(
        "--data",
        help="'shapes' (default) or a folder with images/ + captions.jsonl (video: video files + labels.jsonl)",
    )
    t.add_argument(
        "--preset",
        help="model preset (see `mmfusion models`); default per task: clip-tiny, fusion-small, caption-tiny, "
        "vqa-tiny, video-tiny. `train vqa --preset caption-tiny` answers by generation through a caption decoder",
    )
    t.add_argument(
        "--strategy", help="fusion: early/late/... strategy (concat, late, attention, cross_attention, gated, "
        "unified, lowrank); same as --model.strategy"
    )  # fmt: skip
    t.add_argument("--out", help="output directory (default runs/clip)")
    t.add_argument("--steps", type=int, help="optimiser steps")
    t.add_argument("--epochs", type=float, help="passes over a folder dataset")
    t.add_argument("--time", help="wall-clock budget: 90s, 3m, 1h")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval",
        help="measure a model",
        description="Evaluate a checkpoint; prints the metrics and "
        "writes a JSON report and PNG plots (default: RUN/eval/ for a training run directory).",
    )
    e.add_argument(
        "kind", choices=["retrieval", "zeroshot", "all", "fusion", "caption", "vqa"],
        help="which evaluation (fusion: a fusion classifier on its held-out split, or on --data FILE.npz; caption: "
             "BLEU, CIDEr and attribute accuracy; vqa: accuracy per question type)",
    )  # fmt: skip
    add_model_options(e)
    e.add_argument(
        "--data",
        default="shapes",
        help="'shapes' (in memory) or a folder (captions.jsonl for "
        "retrieval; class folders root/<class>/ for zero-shot)",
    )
    e.add_argument("--n", type=int, default=1000, help="retrieval: images to rank (0 = all in a folder); "
                   "caption / vqa: images / questions")  # fmt: skip
    e.add_argument("--split", default="test", help="retrieval on ShapesWorld: test or heldout")
    e.add_argument("--per-class", type=int, default=50, help="zero-shot on ShapesWorld: images per class")
    e.add_argument("--templates", help="zero-shot prompts: a file (one per line) or 'a photo of a {}.|a {}'")
    e.add_argument("--json", help="where to write the JSON report")
    e.add_argument("--out", help="folder for the report and plots")
    e.set_defaults(func=cmd_eval)

    from .index_cmds import add_parsers as add_index_parsers

    add_index_parsers(sub)
    from .transcribe_cmd import add_parser as add_transcribe_parser

    add_transcribe_parser(sub)
    from .ask_cmd import add_parser as add_ask_parser

    add_ask_parser(sub)
    from .serve_cmd import add_parser as add_serve_parser

    add_serve_parser(sub)
    from .bench_cmd import add_parser as add_bench_parser

    add_bench_parser(sub)
    from .classify_cmd import add_parser as add_classify_parser

    add_classify_parser(sub)
    from .caption_cmd import add_parser as add_caption_parser

    add_caption_parser(sub)

    m = sub.add_parser("models", help="list model presets")
    m.set_defaults(func=cmd_models)

    from .demo_cmd import add_parser as add_demo_parser

    add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
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
