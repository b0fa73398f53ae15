"""``mmfusion data shapes``: ShapesWorld written in the on-disk formats (images, captions, questions, sounds,
video clips)."""

from __future__ import annotations

import argparse

from ..config import ConfigError, merge, override_args, parse_override
from .common import command


def _data_video(args: argparse.Namespace, extra: list[str]) -> int:
    """`mmfusion data shapes --video`: ShapesWorld clips as MP4 files + labels.jsonl per split."""
    from ..data.video import ShapesVideo, ShapesVideoConfig, export_videos

    cfg = ShapesVideoConfig()
    for text in override_args(extra):
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
    for text in override_args(extra):
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


def add_parser(sub) -> None:
    d = command(
        sub,
        "data",
        cmd_data,
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
