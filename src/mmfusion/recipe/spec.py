"""A recipe file read and checked: ``out`` and an ordered list of named steps of known kinds.

Every error names the file, the line and the step, and what to write instead: a recipe is checked whole before any
step runs. A step refers to an earlier step's output by its name (``model: clip``), or to a path inside it
(``paths: [world/test/images]``); a name that comes later is an error, so the steps form no cycle.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError


class RecipeError(ConfigError):
    """A recipe that cannot run as written; the message names the file, line and step, and the fix."""


@dataclass(frozen=True)
class Kind:
    """What a step of this kind runs, and which of its keys name other steps' outputs."""

    name: str
    command: str  # the mmfusion command it runs in-process
    module: str  # the cli module that defines the command's options
    help: str
    refs: tuple[str, ...] = ()  # keys whose value may name an earlier step (or a path inside its output)
    output_flag: str | None = "out"  # the option the step's own directory goes to; None: no output (serve)
    reserved: tuple[str, ...] = ()  # options the recipe sets itself
    dotted: bool = False  # takes `a.b: value` options (config dataclass fields)
    policy: str = "fresh"  # before a re-run: fresh (remove the old output), resume (train), incremental (index)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("data", "data", "data_cmd", "source: shapes (exported like `mmfusion data shapes`) or a folder of yours",
             dotted=True, reserved=("what",)),
        Kind("train", "train", "train_cmd", "task: clip|caption|vqa|...; preset, steps/epochs/time, config, a.b: value",
             refs=("data", "init.from_clip", "init.from_captioner", "distill.teacher"), dotted=True,
             reserved=("resume", "nproc"), policy="resume"),
        Kind("eval", "eval", "eval_cmd", "reports: [retrieval, zeroshot, composition, caption, vqa, ...] of model",
             refs=("model", "data", "rerank"), reserved=("kind", "json")),
        Kind("export", "export", "export_cmd", "format: onnx (default) of model", refs=("model",)),
        Kind("quantize", "quantize", "quantize_cmd", "an export (model) to int8, kept only if its quality gate passes",
             refs=("model", "verify", "calibration", "labels"), reserved=("report",)),
        Kind("index", "index", "index_cmds", "paths (folders or data steps) indexed with model",
             refs=("model", "paths"), output_flag="db", reserved=("from_embeddings", "json"), policy="incremental"),
        Kind("serve", "serve", "serve_cmd", "the service (last step; runs until Ctrl-C): db, model, captioner, ...",
             refs=("db", "model", "captioner", "answerer", "reranker"), output_flag=None, reserved=("config",)),
    )
}  # fmt: skip
TOP_KEYS = ("out", "steps", "description")
STEP_KEYS = ("name", "kind")
# step names the runner's own files take: OUT/reports holds the stamps, OUT/reports/summary.json the last summary
RESERVED_NAMES = {
    "reports": "OUT/reports holds the steps' stamps",
    "summary": "OUT/reports/summary.json is the run's summary",
}


@dataclass
class Step:
    """One step as written: its name, kind, options and where it is in the file."""

    name: str
    kind: Kind
    options: dict[str, Any]
    line: int  # 1-based line of the step in the recipe file
    key_lines: dict[str, int] = field(default_factory=dict)

    def where(self, path: Path, key: str | None = None) -> str:
        line = self.key_lines.get(key, self.line) if key else self.line
        return f"{path}:{line}: step {self.name!r} ({self.kind.name})"


@dataclass
class Recipe:
    path: Path
    out: Path
    steps: list[Step]
    description: str = ""

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise RecipeError(f"{self.path}: no step named {name!r}{_suggest(name, self.names())}; "
                          f"the steps are {', '.join(self.names())}")  # fmt: skip

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def output(self, step: Step) -> Path:
        """Where a step's result lives: OUT/NAME, or the folder a ``data`` step points at."""
        if step.kind.name == "data" and not is_shapes(step):
            return Path(str(step.options["source"])).expanduser()
        return self.out / step.name


def is_shapes(step: Step) -> bool:
    return str(step.options.get("source", "shapes")) == "shapes"


def _suggest(word: str, names: list[str]) -> str:
    close = difflib.get_close_matches(word, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _lines(node: yaml.Node) -> dict[str, int]:
    """Key -> 1-based line of a YAML mapping node's keys."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _duplicate_key(node: yaml.Node) -> tuple[str, int] | None:
    """The first key written twice in a mapping (YAML would keep the last one silently), with its line."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value in seen:
                return k.value, k.start_mark.line + 1
            seen.add(getattr(k, "value", None))
            found = _duplicate_key(v)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            found = _duplicate_key(v)
            if found:
                return found
    return None


def load_recipe(path: str | Path, out: str | Path | None = None) -> Recipe:
    """Read and check a recipe: its keys, its step kinds and names, and that each step refers to earlier ones.

    Args:
        path: the YAML file.
        out: replaces the file's ``out`` (where every step writes).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; see recipes/ for examples (mmfusion run --help)")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must be a mapping with 'out' and 'steps' (see recipes/shapes-demo.yaml)")
    dup = _duplicate_key(node)
    if dup:
        raise RecipeError(f"{path}:{dup[1]}: key {dup[0]!r} is written twice; keep one")
    top = _lines(node)
    for key in data:
        if key not in TOP_KEYS:
            raise RecipeError(f"{path}:{top.get(key, 1)}: unknown key {key!r}{_suggest(str(key), list(TOP_KEYS))}; "
                              f"a recipe has {', '.join(TOP_KEYS)}")  # fmt: skip
    items = data.get("steps")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{path}:{top.get('steps', 1)}: 'steps' must be a list of steps, each with a 'kind' "
                          f"({', '.join(KINDS)}) and a 'name'")  # fmt: skip
    steps_node = next(v for k, v in node.value if getattr(k, "value", None) == "steps")
    steps = [_step(path, item, n, i) for i, (item, n) in enumerate(zip(items, steps_node.value))]
    root = Path(str(out or data.get("out") or f"runs/{path.stem}")).expanduser()  # `out: ~/runs/x` as a shell reads it
    recipe = Recipe(path, root, steps, str(data.get("description", "")))
    _check_names(recipe)
    _check_refs(recipe)
    return recipe


def _step(path: Path, item: Any, node: yaml.Node, i: int) -> Step:
    line = node.start_mark.line + 1
    if not isinstance(item, dict):
        raise RecipeError(f"{path}:{line}: step {i + 1} must be a mapping with 'kind' and 'name', got {item!r}")
    kind = item.get("kind")
    if kind not in KINDS:
        choices = "; ".join(f"{k.name}: {k.help}" for k in KINDS.values())
        raise RecipeError(f"{path}:{line}: step {i + 1} has kind {kind!r}{_suggest(str(kind), list(KINDS))}; "
                          f"a step's kind is one of {choices}")  # fmt: skip
    name = str(item.get("name") or kind)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise RecipeError(f"{path}:{line}: step name {name!r}: use letters, digits, - and _ (it names OUT/{name})")
    if name.lower() in RESERVED_NAMES:
        raise RecipeError(f"{path}:{line}: step name {name!r} is the recipe's own ({RESERVED_NAMES[name.lower()]}); "
                          f"give the step another 'name'")  # fmt: skip
    options = {k: v for k, v in item.items() if k not in STEP_KEYS}
    lines = _lines(node)
    if KINDS[kind].dotted:  # `init: {from_clip: clip}` is `init.from_clip: clip`
        options, lines = _flatten(options, lines)
    step = Step(name, KINDS[kind], options, line, lines)
    for key in options:
        if key in step.kind.reserved or key == step.kind.output_flag:
            raise RecipeError(f"{step.where(path, key)}: {key!r} is set by the recipe (the step writes to OUT/"
                              f"{name}); remove it")  # fmt: skip
    if kind == "serve" and "host" not in options:
        options["host"] = "127.0.0.1"
    return step


def _flatten(options: dict[str, Any], lines: dict[str, int]) -> tuple[dict[str, Any], dict[str, int]]:
    """Nested mappings as dotted keys, each keeping the line of the key it came from."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            inner, _ = _flatten({f"{key}.{k}": v for k, v in value.items()}, {})
            flat.update(inner)
            lines.update({k: lines.get(key, 0) for k in inner})
        else:
            flat[key] = value
    return flat, lines


def _check_names(recipe: Recipe) -> None:
    seen: dict[str, Step] = {}
    for s in recipe.steps:
        if s.name in seen:
            raise RecipeError(f"{s.where(recipe.path)}: another step (line {seen[s.name].line}) is named "
                              f"{s.name!r} too; give each step its own 'name'")  # fmt: skip
        seen[s.name] = s
    for s in recipe.steps[:-1]:
        if s.kind.name == "serve":
            raise RecipeError(f"{s.where(recipe.path)}: serve runs until Ctrl-C, so it must be the last step")


def ref_values(step: Step, key: str) -> list[Any]:
    """The values of a reference key (a list for ``paths``/``labels``, else one value), empty when not given."""
    value = step.options.get(key)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def referenced_step(value: Any, names: list[str]) -> tuple[str, str] | None:
    """(step, path inside its output) when ``value`` names a step (``clip``, ``world/test/images``), else None."""
    if not isinstance(value, str):
        return None
    head, _, rest = value.partition("/")
    return (head, rest) if head in names else None


def _check_refs(recipe: Recipe) -> None:
    names = recipe.names()
    for i, s in enumerate(recipe.steps):
        for key in s.kind.refs:
            for value in ref_values(s, key):
                hit = referenced_step(value, names)
                if hit is None:
                    _check_literal(recipe, s, key, value, names[:i])
                elif names.index(hit[0]) >= i:
                    raise RecipeError(f"{s.where(recipe.path, key)}: {key}: {value!r} names step {hit[0]!r}, which "
                                      f"{'is this step' if hit[0] == s.name else 'comes later'}; a step can only use "
                                      f"the steps above it (move {hit[0]!r} up)")  # fmt: skip


def _check_literal(recipe: Recipe, s: Step, key: str, value: Any, earlier: list[str]) -> None:
    """A value that names no step must be a path that exists, 'shapes', or a model id such as hf:..."""
    text = str(value)
    if ":" in text or text in ("shapes", "none") or Path(text).expanduser().exists():
        return
    raise RecipeError(f"{s.where(recipe.path, key)}: {key}: {text!r} is neither an earlier step"
                      f"{_suggest(text, earlier)} nor an existing path; earlier steps: "
                      f"{', '.join(earlier) or 'none'}")  # fmt: skip
