"""``mmfusion distill`` and ``mmfusion prune``: smaller, faster CLIPs that keep what a bigger one learned.
Both write ordinary runs that eval, index, serve, export and quantize take."""

from __future__ import annotations

import argparse

from .common import command, positive_int

EXAMPLES_DISTILL = """
examples:
  mmfusion distill --teacher runs/clip --student-preset clip-nano --out runs/nano --time 3m
  mmfusion distill --teacher hf:openai/clip-vit-base-patch32 --student-preset clip-tiny --data photos/ --epochs 5
  mmfusion distill --teacher runs/clip --student-preset clip-nano --embed-weight 1 --steps 2000 --out runs/nano
  mmfusion distill --teacher runs/clip --student-preset clip-nano --inherit --time 3m --out runs/nano-inherit

The student trains on the pairs as `mmfusion train clip` does, and besides learns the teacher's image-text
similarity distributions over each batch (affinity mimicking, as TinyCLIP); --embed-weight also regresses the
teacher's embeddings (through a learned projection when the widths differ; it is not saved with the student).
--inherit starts the student from the teacher's weights (TinyCLIP's weight inheritance: evenly spaced blocks,
the most important heads and MLP channels, the leading channels of each width) when it is a native CLIP with the
same inputs. Any option of `mmfusion train clip` works too (--train.lr=..., --distill.inherit_by=leading).
"""

EXAMPLES_PRUNE = """
examples:
  mmfusion prune --model runs/clip --heads 0.3 --mlp 0.3 --out runs/clip-p30                # no fine-tuning
  mmfusion prune --model runs/clip --heads 0.3 --mlp 0.3 --recover 2m --out runs/clip-p30   # recover 2 minutes
  mmfusion prune --model runs/clip --sweep 0.1,0.3,0.5,0.7 --recover 1m --out runs/clip-sweep

Importance is measured on data (the ShapesWorld the model was trained on, or --data FOLDER): the first-order
estimate of how much the contrastive loss would change without each attention head and MLP channel. The least
important fraction of each tower is removed for real (smaller matrices, fewer heads: a smaller config), and
--recover fine-tunes what is left with the original model as teacher. The report gives images/s and R@10 /
semantic precision before and after.
"""


def cmd_distill(args: argparse.Namespace, extra: list[str]) -> int:
    from .train_cmd import cmd_train

    train_args = argparse.Namespace(
        task="clip", config=args.config, data=args.data, preset=args.student_preset, strategy=None, out=args.out,
        steps=args.steps, epochs=args.epochs, time=args.time, resume=args.resume, nproc=None,
    )  # fmt: skip
    weights = {"affinity_weight": args.affinity_weight, "embed_weight": args.embed_weight,
               "contrastive_weight": args.contrastive_weight}  # fmt: skip
    given = [f"--distill.{k}={v}" for k, v in weights.items() if v is not None]
    if args.inherit:
        given.append("--distill.inherit=true")
    return cmd_train(train_args, [f"--distill.teacher={args.teacher}", *given, *extra])


def cmd_prune(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError
    from ..train.prune_run import PruneOptions, prune_run

    if extra and not args.recover:
        raise ConfigError(f"unrecognised arguments {extra}: training options apply to --recover only")
    towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
    sweep = tuple(float(r) for r in args.sweep.split(",")) if args.sweep else ()
    for r in (args.heads, args.mlp, *sweep):
        if not 0 <= r < 1:
            raise ConfigError(f"pruning ratios are fractions in [0, 1), got {r}")
    opts = PruneOptions(
        heads=args.heads, mlp=args.mlp, towers=towers, data=args.data, batches=args.batches,
        batch_size=args.batch_size, seed=args.seed, recover=args.recover,
        teacher=None if args.teacher == "none" else args.teacher, eval_n=args.eval_n, sweep=sweep,
        overrides=tuple(extra),
    )  # fmt: skip
    report = prune_run(args.model, args.out, opts)
    if report["task"] == "prune-sweep":
        for p in report["points"]:
            q = "  ".join(f"{k} {p[k]:.3f}" for k in ("i2t_R@10", "t2i_R@10", "semantic_P@1") if k in p)
            print(f"  {p['ratio']:>4.0%} removed: {p['images_per_s']:8.1f} images/s  {q}")
        print(f"curve: {args.out}/prune_curve.png (and .json)")
        return 0
    for tower, k in report["kept"].items():
        if tower != "parameters":
            print(f"{tower}: heads kept per block {', '.join(k['heads'])}; MLP channels {', '.join(k['mlp'])}")
    p = report["kept"]["parameters"]
    print(f"parameters {p['before']:,} -> {p['after']:,}; image encoding {report['images_per_s']['before']:.0f} -> "
          f"{report['images_per_s']['after']:.0f} images/s ({report['speedup']:.2f}x)")  # fmt: skip
    before, after = report["quality"]["before"], report["quality"]["after"]
    for k in after:
        print(f"  {k:13s} {before[k]:.3f} -> {after[k]:.3f} ({after[k] - before[k]:+.3f})")
    print(f"model: {args.out}/model   report: {args.out}/prune_report.json")
    return 0


def add_parser(sub) -> None:
    d = command(
        sub,
        "distill",
        cmd_distill,
        help="train a small CLIP that learns from a bigger one (affinity mimicking)",
        description="Train a student CLIP (a preset) on the pairs and on a teacher's image-text similarities.",
        epilog=EXAMPLES_DISTILL,
    )
    d.add_argument("--teacher", required=True, help="a native run or checkpoint, hf:<hub-id>, or an ONNX export")
    d.add_argument("--student-preset", default="clip-nano", help="the student's preset (default clip-nano; see "
                   "`mmfusion models`)")  # fmt: skip
    d.add_argument("--out", help="the student's run directory (default runs/clip)")
    d.add_argument("--data", help="'shapes' (default) or a folder with images/ + captions.jsonl")
    d.add_argument("--config", help="a YAML file with any `mmfusion train clip` option")
    d.add_argument("--steps", type=int, help="optimiser steps")
    d.add_argument("--epochs", type=float, help="passes over a folder dataset")
    d.add_argument("--time", help="wall-clock budget: 90s, 3m, 1h")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    d.add_argument("--affinity-weight", type=float, help="weight of affinity mimicking (default 1)")
    d.add_argument("--embed-weight", type=float, help="weight of embedding regression (default 0; a learned "
                   "projection bridges different widths)")  # fmt: skip
    d.add_argument("--contrastive-weight", type=float, help="weight of the contrastive loss on the pairs (default 1)")
    d.add_argument("--inherit", action="store_true", help="initialise the student from a subset of the teacher's "
                   "blocks, heads and channels (a native CLIP with the same inputs; distill.inherit)")  # fmt: skip

    p = command(
        sub,
        "prune",
        cmd_prune,
        help="remove the least important attention heads and MLP channels of a CLIP",
        description="Structured pruning of a native CLIP, measured on data, with optional recovery training.",
        epilog=EXAMPLES_PRUNE,
    )
    p.add_argument("--model", required=True, help="a native CLIP run or checkpoint")
    p.add_argument("--out", required=True, help="the pruned run's directory (its model in OUT/model)")
    p.add_argument("--heads", type=float, default=0.3, help="fraction of each tower's heads removed (0.3)")
    p.add_argument("--mlp", type=float, default=0.3, help="fraction of each tower's MLP channels removed (0.3)")
    p.add_argument("--towers", default="image,text", help="which towers to prune (image,text)")
    p.add_argument("--recover", help="fine-tune after pruning: a time (2m) or a number of steps; default none")
    p.add_argument("--teacher", default="original", help="recovery's teacher: 'original' (the model before "
                   "pruning), 'none', or a model")  # fmt: skip
    p.add_argument("--data", default="shapes", help="importance and recovery data: 'shapes' (the model's "
                   "ShapesWorld) or a folder with captions.jsonl")  # fmt: skip
    p.add_argument("--batches", type=positive_int, default=8, help="batches importance is measured on (8)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="pairs per importance batch (64)")
    p.add_argument("--seed", type=int, default=0, help="which batches (the scores are the same for a seed)")
    p.add_argument("--eval-n", type=int, default=500, help="test scenes ranked for the report (500; 0: none)")
    p.add_argument("--sweep", help="comma-separated ratios (heads and MLP alike) to prune at and draw the "
                   "quality/speed curve, e.g. 0.1,0.3,0.5,0.7")  # fmt: skip
