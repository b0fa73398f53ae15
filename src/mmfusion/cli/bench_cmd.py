"""``mmfusion bench fusion``: which fusion strategy wins, on data where the answer is known."""

from __future__ import annotations

import argparse

from .common import command

EXAMPLES = """
examples:
  mmfusion bench fusion                                   # every strategy + baselines, 2 seeds (~12 min on 2 cores)
  mmfusion bench fusion --strategies concat late attention --seeds 0 --out runs/quick
  mmfusion bench fusion --tasks correspondence --steps 600

Tasks (ShapesWorld, one object per example): complementary (greyscale shape + a sound whose pitch is the
colour; label colour x shape) and correspondence (does the sound's colour match the image's?).
"""


def add_parser(sub) -> None:
    p = command(
        sub,
        "bench",
        cmd_bench,
        help="benchmarks that train and compare models (fusion strategies)",
        description="Train every fusion strategy and each unimodal baseline on the ShapesWorld fusion tasks with the "
        "same data and budget; write a table (accuracy mean +- std, parameters, time, accuracy with a modality "
        "missing, with and without modality-dropout training), a JSON report and a bar chart.",
        epilog=EXAMPLES,
    )
    p.add_argument("what", choices=["fusion"], help="which benchmark")
    p.add_argument("--out", default="runs/bench-fusion", help="where the table, JSON and chart go")
    p.add_argument("--tasks", nargs="+", choices=["complementary", "correspondence"], help="default: both")
    p.add_argument("--strategies", nargs="+", help="default: all (concat late attention cross_attention gated ...)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds per model (default 0 1)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per model (default 300)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3; the same for every model)")
    p.add_argument("--train-size", type=int, default=6000, help="training examples per task")
    p.add_argument("--test-size", type=int, default=1500, help="test examples per task")
    p.add_argument("--dropout-seeds", type=int, default=1, help="seeds of the modality-dropout runs (0: none)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError
    from ..data.fusion_tasks import TASKS
    from ..train.fusion_bench import markdown_table, run_bench

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion bench --help")
    report = run_bench(
        args.out, tuple(args.tasks or TASKS), tuple(args.strategies) if args.strategies else None, tuple(args.seeds),
        args.steps, args.batch_size, args.lr, args.train_size, args.test_size, args.dropout_seeds,
        threads=args.threads, progress=not args.quiet,
    )  # fmt: skip
    print(markdown_table(report))
    print(f"report: {args.out}/fusion_bench.json, table: {args.out}/fusion_bench.md, chart: {report['plot']}")
    return 0
