"""The shape of the package: layers import downwards only, no import cycles, no oversized files, and every entry
of the model registry names something that exists.

Imports are read from the source (every ``import``, at module level or inside a function), so a lazy import
that would close a cycle or reach up a layer is caught as well.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from mmfusion.models.registry import FAMILIES, resolve, train_tasks

SRC = Path(__file__).resolve().parents[1] / "src" / "mmfusion"
MAX_LINES = 600

# bottom-up; a module may import from its own layer's packages and from the layers below (docs/ARCHITECTURE.md)
LAYERS = [
    {"version", "config", "interfaces", "utils"},
    {"data"},
    {"modules"},
    {"models"},
    {"backends"},
    {"eval"},
    {"export"},  # uses models to trace, backends to run, eval to measure the quantised model
    {"train"},
    {"tasks"},
    {"index"},
    {"serve"},
    {"cli", "recipe"},  # a recipe runs the commands of cli in order (cli/run_cmd.py runs a recipe)
    {"", "__main__"},  # the package root: mmfusion/__init__.py, the public API, and `python -m mmfusion`
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ["mmfusion", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mmfusion modules an import statement loads (``from .x import name`` counts x.name if it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mmfusion"]
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "mmfusion":
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module].update(t for t in _targets(module, path, node) if t in MODULES and t != module)
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(RANK), "add the new package to LAYERS and to docs/ARCHITECTURE.md"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def _upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if RANK[_layer(b)] > RANK[_layer(a)])


def test_layers_import_downwards_only():
    assert _upward(_graph()) == []


def test_the_checks_can_fail():
    """Negative controls: a made-up cycle and a made-up upward import are found."""
    edges = {"mmfusion.data.shapes": {"mmfusion.data.sound"}, "mmfusion.data.sound": {"mmfusion.data.shapes"}}
    assert _cycles(edges) == [["mmfusion.data.shapes", "mmfusion.data.sound"]]
    assert _upward({"mmfusion.index.search": {"mmfusion.serve.app", "mmfusion.data.images"}}) == [
        "mmfusion.index.search -> mmfusion.serve.app"
    ]


def test_no_source_file_is_too_long():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by responsibility (house rule: at most {MAX_LINES} lines)"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_registry_entries_resolve(name):
    spec = FAMILIES[name]
    for task in spec.tasks:
        adapter = spec.task_adapter(task)
        assert callable(getattr(adapter, "build", None)), f"{name}: {task} adapter has no build()"
    if spec.native:
        assert spec.config is not None and spec.model is not None
        assert getattr(spec.model, "family", None) == name, "the model class must say which family it is"
    else:
        assert spec.model_types and callable(getattr(resolve(spec.adapter), "from_pretrained", None))


def test_every_train_task_has_a_default_preset():
    import mmfusion

    for task, spec in train_tasks().items():
        assert spec.default_preset in mmfusion.list_models(), task


def test_every_eval_kind_has_a_runner():
    from mmfusion.cli.eval_cmd import RUNNERS

    assert {k for spec in FAMILIES.values() for k in spec.eval_kinds} == set(RUNNERS)
