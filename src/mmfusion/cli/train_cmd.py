"""``mmfusion train TASK``: every option is a field of :class:`mmfusion.train.RunConfig`, given in a YAML file
(``--config run.yaml``) or as ``--train.lr=1e-3`` / ``--model.vision.layers=3``; the tasks and their default
presets come from the model registry."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, deep_update, format_help, from_dict, load_yaml, with_overrides
from .common import command

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
  mmfusion train rerank --init.from_clip=runs/clip --time 3m  # a cross-attention re-ranker over a CLIP
  mmfusion train rerank --config recipes/rerank-captioner.yaml --init.from_captioner=runs/caption   # a captioner
  mmfusion train video --time 3m                              # TimeSformer (video-tiny) on ShapesWorld actions
  mmfusion train video --model.encoder.attention=pool --time 3m --out runs/video-pool   # frame-pooling baseline
  mmfusion train video --data runs/video-data --epochs 30     # video files + labels.jsonl (data shapes --video)

every option (YAML keys have the same dotted names):
"""


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
        data = deep_update(data, load_yaml(args.config))
    from ..models.registry import train_tasks

    preset = args.preset or (None if data.get("preset") else train_tasks()[args.task].default_preset)
    named = {"data": {"source": args.data} if args.data else {}, "preset": preset, "out": args.out}
    if getattr(args, "strategy", None):
        if args.task != "fusion":
            raise ConfigError("--strategy is for `mmfusion train fusion`")
        named["model"] = {"strategy": args.strategy}
    length = {k: getattr(args, k) for k in ("steps", "epochs", "time") if getattr(args, k) is not None}
    if length:  # one length replaces the others (a resumed run may be extended)
        named["train"] = {"steps": None, "epochs": None, "time": None, **length}
    data = deep_update(data, {k: v for k, v in named.items() if v})
    data = with_overrides(data, extra)
    data["task"] = args.task
    data["out"] = data.get("out") or f"runs/{args.task}"
    cfg = from_dict(RunConfig, data)
    cfg.family().task_adapter(cfg.task)  # fail now, not after loading data, on a preset of the wrong family
    cfg.model_config()  # ... or on a bad model override
    return cfg


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..train import train

    cfg = build_run_config(args, extra)
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, getattr(args, "argv", None) or sys.argv[1:], cfg)
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 speaks for the run
    print(f"trained {result.steps} steps ({result.samples:,} samples) in {result.elapsed_s:.0f}s")
    print(f"model:   {result.out / 'model'}   (mmfusion.load('{result.out}'))")
    print(f"metrics: {result.out / 'metrics.jsonl'}")
    print(f"plot:    {result.out / 'plots' / 'training.png'}")
    next_step = cfg.family().next_steps.get(cfg.task)
    if next_step:
        print(f"try:     {next_step.format(out=result.out)}")
    for line in result.summary:  # the held-out report, for tasks that make one
        print(line)
    return 0


def _launch(nproc: int, argv: list[str], cfg) -> int:
    """The same command in ``nproc`` processes on this machine, through torch's elastic launcher (torchrun),
    each with its share of the cores; the launcher ends every process when one fails."""
    from ..utils.threads import usable_cpus

    if cfg.train.batch_size % nproc:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} (the global batch) must be divisible by "
                          f"--nproc {nproc}: each process takes batch_size / nproc")  # fmt: skip
    rest, skip = [], False
    for a in argv:  # the command without --nproc, which each process must not act on again
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and not cfg.train.threads:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "mmfusion.cli.main", *rest]  # fmt: skip
    return subprocess.run(cmd, env=env).returncode


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


def add_parser(sub) -> None:
    t = command(
        sub,
        "train",
        cmd_train,
        help="train a model",
        description="Train a model. Length: exactly one of --steps, --epochs, --time.",
        epilog=EXAMPLES_TRAIN + _train_options_help(),
    )
    from ..models.registry import train_tasks

    tasks = train_tasks()
    t.add_argument(
        "task",
        choices=list(tasks),
        help="what to train: "
        + "; ".join(
            f"{task}: {spec.help} (default preset {spec.default_preset}"
            + (f"; its data options: --{spec.data_config}.*" if spec.data_config else "")
            + ")"
            for task, spec in tasks.items()
        ),
    )
    t.add_argument("--config", help="YAML file with any of the options below")
    t.add_argument(
        "--data",
        help="'shapes' (default) or a folder with images/ + captions.jsonl (video: video files + labels.jsonl)",
    )
    t.add_argument(
        "--preset",
        help="model preset (see `mmfusion models`); default per task: "
        + ", ".join(f"{spec.default_preset} ({task})" for task, spec in tasks.items())
        + ". `train vqa --preset caption-tiny` answers by generation through a caption decoder; `train rerank "
        "--preset caption-tiny` fine-tunes a captioner to re-rank by its captions' likelihood",
    )
    t.add_argument(
        "--strategy", help="fusion: early/late/... strategy (concat, late, attention, cross_attention, gated, "
        "unified, lowrank); same as --model.strategy"
    )  # fmt: skip
    t.add_argument("--out", help="output directory (default runs/TASK)")
    t.add_argument("--steps", type=int, help="optimiser steps")
    t.add_argument("--epochs", type=float, help="passes over a folder dataset")
    t.add_argument("--time", help="wall-clock budget: 90s, 3m, 1h")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--nproc", type=int, help="train in this many processes on this machine (torchrun; "
                   "train.batch_size stays the global batch, each process takes batch_size / nproc). Several "
                   "machines: torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint "
                   "HOST:PORT -m mmfusion train ...")  # fmt: skip
