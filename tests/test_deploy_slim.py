"""deploy/Dockerfile.slim: the service on an ONNX export without PyTorch. No Docker daemon here, so the checks read the
file as the main Dockerfile's do, and check that its requirements cover what the service imports with torch absent."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import metadata

from tests.export.helpers import NO_TORCH
from tests.test_deploy import DEPLOY, context_problems, instructions, routes, runtime_problems  # noqa: F401

SLIM = DEPLOY / "Dockerfile.slim"
REQUIREMENTS = DEPLOY / "requirements-slim.txt"


def _requirements() -> set[str]:
    names = set()
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def _closure(names: set[str]) -> set[str]:
    """The distributions ``names`` install, with their own requirements (extras' optional ones left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r and name != "uvicorn":  # uvicorn[standard] is what the list asks for
                continue
            todo.append(re.split(r"[<>=\[ ;(!~]", r, maxsplit=1)[0].lower().replace("_", "-"))
    return seen


def test_slim_dockerfile_installs_no_torch_and_serves_an_export(routes):  # noqa: F811
    ins = instructions(SLIM.read_text())
    runs = [a for k, a in ins if k == "RUN"]
    assert not any(re.search(r"\btorch\b", a) for a in runs), "the slim image installs torch"
    assert any("pip install -r requirements-slim.txt" in a for a in runs)
    assert any("pip install --no-deps ." in a for a in runs), "the package's own requirements would pull torch"
    assert context_problems(ins, (SLIM.parents[1] / ".dockerignore").read_text()) == []
    assert runtime_problems(ins, routes) == []
    cmd = json.loads([a for k, a in ins if k == "CMD"][-1])
    assert cmd[cmd.index("--model") + 1].startswith("/data/"), "the export lives in the volume"


IMPORTED = (
    NO_TORCH
    + """
from mmfusion.cli.main import make_parser
make_parser(only="serve")
import mmfusion.serve.app, mmfusion.backends.ort, mmfusion.index
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith("mmfusion") and m.__file__)))
"""
)


def _module_imports(path: str) -> set[str]:
    """Top-level names a module imports when it is loaded (imports inside functions run only when called)."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in (
            ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else []
        ):
            if isinstance(sub, ast.Import):
                names |= {a.name.split(".")[0] for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and not sub.level and sub.module:
                names.add(sub.module.split(".")[0])
    return names


def test_slim_requirements_cover_what_serving_an_export_imports():
    """Every third-party package that the modules of `mmfusion serve` import when loaded (torch blocked), and the
    runtime, the server and FAISS (imported when an index opens), is installed by requirements-slim.txt."""
    done = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    top = {"onnxruntime", "uvicorn", "faiss"}.union(*(_module_imports(f) for f in json.loads(done.stdout)))
    top -= set(sys.stdlib_module_names) | {"mmfusion"}
    dists = metadata.packages_distributions()
    needed = {d.lower().replace("_", "-") for m in top for d in dists.get(m, [m])}
    missing = needed - _closure(_requirements())
    assert not missing, f"serving an export imports {sorted(missing)}, which requirements-slim.txt does not install"
    assert not {"torch", "safetensors", "matplotlib"} & needed
