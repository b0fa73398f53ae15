"""``mmfusion run RECIPE.yaml``: a recipe's steps (data -> train -> eval -> export/quantize -> index -> serve), each
skipped when it is up to date (:mod:`mmfusion.recipe`)."""

from __future__ import annotations

import argparse

from .common import command

EXAMPLES = """
examples:
  mmfusion run recipes/shapes-demo.yaml                 # every step not up to date, then the web page
  mmfusion run recipes/photos.yaml --no-serve           # stop before serving
  mmfusion run recipes/photos.yaml --dry-run            # what would run, and why
  mmfusion run recipes/photos.yaml --force clip         # train again (and redo what reads it)
  mmfusion run recipes/photos.yaml --until eval         # the steps up to eval
  mmfusion run recipes/photos.yaml --only index         # one step (the steps it reads must have run)

a recipe:
  out: runs/photos                 # every step writes OUT/STEP; OUT/reports/STEP.json is its stamp and metrics
  steps:                           # in order; a step names earlier steps' outputs (model: clip, paths: [world/test])
    - {name: photos, kind: data, source: ~/photos}     # or source: shapes, with test: 500, heldout: 0, ...
    - name: clip
      kind: train                  # keys are the command's options: mmfusion train --help
      task: clip
      data: photos
      time: 10m
      train.batch_size: 64         # config options as dotted keys (or nested: train: {batch_size: 64})
    - {name: eval, kind: eval, model: clip, data: photos, reports: [retrieval]}
    - {name: onnx, kind: export, model: clip}
    - {name: int8, kind: quantize, model: onnx, verify: photos, max_drop: 0.02}
    - {name: index, kind: index, model: int8, paths: [photos]}
    - {name: serve, kind: serve, db: index, port: 8000}   # host 127.0.0.1 unless it says otherwise

Kinds: data (mmfusion data shapes, or a folder of yours), train, eval (reports: the eval kinds; default retrieval
and zeroshot), export (onnx), quantize (the quality gate: a refusal stops the recipe), index, serve (last; runs until
Ctrl-C). A step runs when it has not finished, when its settings or a step it reads changed, or when a file of yours
it reads changed (size or time); a training cut short resumes. Paths are relative to where you run the command.
See recipes/ for complete examples.
"""


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError
    from ..recipe import RunOptions, load_recipe, run_recipe

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; step options go in the recipe (mmfusion run --help)")
    recipe = load_recipe(args.recipe, out=args.out)
    opts = RunOptions(force=args.force, only=args.only, until=args.until, serve=not args.no_serve,
                      dry_run=args.dry_run, quiet=args.quiet, verbose=args.verbose)  # fmt: skip
    run_recipe(recipe, opts)
    return 0


def add_parser(sub) -> None:
    p = command(
        sub,
        "run",
        cmd_run,
        help="run a recipe: data, train, eval, export, index, serve, each step skipped when up to date",
        description="Run the steps of a recipe file in order, each as the mmfusion command of its kind with the "
        "step's keys as options; a step whose output is complete and whose settings and inputs are unchanged is "
        "skipped. A summary table (step, ran/skipped, time, key metrics) ends the run.",
        epilog=EXAMPLES,
    )
    p.add_argument("recipe", help="the recipe YAML file (see recipes/)")
    p.add_argument("--out", help="where the steps write (default: the recipe's 'out')")
    p.add_argument("--force", action="append", default=[], metavar="STEP",
                   help="run STEP even if it is up to date (and so every step that reads it); repeatable")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("--only", metavar="STEP", help="run STEP alone (the steps it reads must have run)")
    g.add_argument("--until", metavar="STEP", help="run the steps up to STEP and stop")
    p.add_argument("--no-serve", action="store_true", help="stop before the serve step")
    p.add_argument("--dry-run", action="store_true", help="print what would run (as mmfusion commands) and why")
