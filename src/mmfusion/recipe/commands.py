"""A step as the mmfusion command it stands for: its options become that command's flags, parsed by that command's
own parser and run by that command's own function, in this process.

So a recipe key means exactly what the flag of the same name means (``time`` is ``mmfusion train --time``,
``n`` is ``mmfusion eval --n``), its defaults and checks are the command's, and ``--dry-run`` can print each step as
the command line it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from .spec import KINDS, Recipe, RecipeError, Step, _suggest, is_shapes, referenced_step

# the positional argument of each command, and the recipe key that gives it (None: the recipe sets it)
POSITIONAL = {"data": ("what", None), "train": ("task", "task"), "eval": ("kind", "reports"),
              "export": ("format", "format"), "index": ("paths", "paths")}  # fmt: skip
MANAGED = {"help", "func", "command", "quiet", "verbose"}


class _Parser(argparse.ArgumentParser):
    """The commands' parsers, raising a RecipeError instead of printing usage and exiting."""

    def error(self, message: str):
        raise RecipeError(message)


@cache
def root_parser() -> _Parser:
    """One parser holding the commands a recipe runs, built by their own modules."""
    p = _Parser(prog="mmfusion", add_help=False)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(k.module for k in KINDS.values()):
        importlib.import_module(f"..cli.{module}", __package__).add_parser(sub)
    return p


def command_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in root_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _actions(command: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in command_parser(command)._actions if a.dest not in MANAGED}


def _text(value: Any) -> str:
    """A value as a command line gives it (YAML/JSON for the --a.b=value options: true, null, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value)


def _flags(recipe: Recipe, step: Step, command: str, skip: set[str], resolve: Callable[[Any], str]) -> list[str]:
    """The step's options as the command's flags: a key is a flag's name (``zeroshot_per_class``, ``labels``)."""
    actions, out = _actions(command), []
    for key, value in step.options.items():
        if key in skip:
            continue
        dest = key.replace("-", "_")
        if "." in key and step.kind.dotted:
            out.append(f"--{key}={resolve(value) if key in step.kind.refs else _text(value)}")
            continue
        action = actions.get(dest)
        if action is None or not action.option_strings:
            known = sorted(d for d, a in actions.items() if a.option_strings and d not in step.kind.reserved)
            dotted = " and config options such as train.lr: 1e-3" if step.kind.dotted else ""
            raise RecipeError(f"{step.where(recipe.path, key)}: unknown key {key!r}{_suggest(dest, known)}; a "
                              f"{step.kind.name} step takes {', '.join(known)}{dotted} (mmfusion {command} "
                              f"--help)")  # fmt: skip
        out += _flag(recipe, step, key, action, value, resolve)
    return out


def _flag(recipe: Recipe, step: Step, key: str, action: argparse.Action, value: Any, resolve) -> list[str]:
    flag = action.option_strings[0]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise RecipeError(f"{step.where(recipe.path, key)}: {key} is true or false, not {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value == isinstance(action, argparse._StoreTrueAction) else []
    values = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction):
        return [x for v in values for x in (flag, resolve(v) if key in step.kind.refs else _text(v))]
    if isinstance(value, list):
        raise RecipeError(f"{step.where(recipe.path, key)}: {key} takes one value, not a list")
    return [flag, resolve(value) if key in step.kind.refs else _text(value)]


def step_commands(recipe: Recipe, step: Step, resolve: Callable[[Any], str], reports: Path) -> list[list[str]]:
    """The command lines a step runs (an eval step one per report; a data step of your folder none).

    Args:
        resolve: turns a reference value (``clip``, ``world/test/images``) into the text given to the command.
        reports: the recipe's report folder (a quantize step's gate report goes there, passed or refused).
    """
    kind = step.kind.name
    out = str(recipe.output(step))
    positional = POSITIONAL.get(kind, (None, None))[1]
    skip = {"source", positional} if positional else {"source"}
    if kind == "data":
        if not is_shapes(step):
            extra = sorted(set(step.options) - {"source"})
            if extra:
                raise RecipeError(f"{step.where(recipe.path, extra[0])}: a data step of your own folder takes only "
                                  f"'source'; {extra[0]!r} is for source: shapes")  # fmt: skip
            return []
        return [["data", "shapes", "--out", out, *_flags(recipe, step, "data", skip, resolve)]]
    flags = _flags(recipe, step, step.kind.command, skip, resolve)
    if step.kind.output_flag:
        flags = [f"--{step.kind.output_flag}", out, *flags]
    if kind == "train":
        return [["train", str(_required(recipe, step, "task")), *flags]]
    if kind == "eval":
        kinds = step.options.get("reports") or ["retrieval", "zeroshot"]
        return [["eval", str(k), *flags] for k in (kinds if isinstance(kinds, list) else [kinds])]
    if kind == "export":
        return [["export", str(step.options.get("format", "onnx")), *flags]]
    if kind == "index":
        paths = [resolve(p) for p in (_listed(_required(recipe, step, "paths")))]
        return [["index", *paths, *flags]]
    if kind == "quantize":
        return [["quantize", *flags, "--report", str(reports / f"{step.name}.gate.json")]]
    return [[step.kind.command, *flags]]


def _required(recipe: Recipe, step: Step, key: str) -> Any:
    if step.options.get(key) in (None, "", []):
        raise RecipeError(f"{step.where(recipe.path)}: needs '{key}' ({step.kind.help})")
    return step.options[key]


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def parse(argv: list[str], quiet: bool = False, verbose: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """A command line parsed by its command's own parser (an error is a RecipeError)."""
    prefix = ["-q"] * quiet + ["-v"] * verbose
    args, extra = root_parser().parse_known_args(prefix + argv)
    args.argv = argv
    return args, extra


def check(recipe: Recipe, step: Step, argv: list[str]) -> None:
    """Parse a step's command line as its command would, before anything runs; a training's config is resolved
    too, so a misspelt ``train.lr`` or a preset of the wrong family fails now, not after the steps before it."""
    try:
        args, extra = parse(argv)
        if extra and not step.kind.dotted:
            raise RecipeError(f"unrecognised {' '.join(extra)}")
        if step.kind.name == "train":
            from ..cli.train_cmd import build_run_config

            build_run_config(args, extra)
    except (RecipeError, ValueError, KeyError) as e:
        if isinstance(e, RecipeError) and str(e).startswith(str(recipe.path)):
            raise
        raise RecipeError(f"{step.where(recipe.path)}: {e} (in: {shell(argv)})") from None


def run(argv: list[str], quiet: bool, verbose: bool) -> int:
    """Run one command line in this process, as ``mmfusion ...`` would; its exit status."""
    args, extra = parse(argv, quiet, verbose)
    return args.func(args, extra) or 0


def shell(argv: list[str]) -> str:
    return "mmfusion " + " ".join(shlex.quote(a) for a in argv)


def references(recipe: Recipe, step: Step) -> list[str]:
    """The earlier steps a step reads, in recipe order."""
    names, found = recipe.names(), set()
    for key in step.kind.refs:
        values = step.options.get(key)
        for v in values if isinstance(values, list) else [values]:
            hit = referenced_step(v, names)
            if hit:
                found.add(hit[0])
    return [n for n in names if n in found]
