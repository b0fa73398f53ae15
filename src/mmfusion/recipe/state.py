"""What a recipe's earlier runs left: per step, a stamp written last, and the fingerprint that says whether the step
is up to date.

``OUT/reports/STEP.json`` is the stamp: written (atomically) after the step's output is complete, with the step's
fingerprint, a run id, its command lines and its key metrics. A step whose stamp is missing did not finish, whatever
its folder holds; a step is re-run when its fingerprint differs from the stamp's. The fingerprint is a hash of the
step's command lines (other steps' outputs written as ``@STEP``, so moving OUT changes nothing), the run ids of the
steps it reads (a step that ran again makes its readers run again) and a stat of each file or folder of yours that it
reads (size and modification time of every file: cheap, and any edit shows). What it reads: the values of its
reference keys, ``config`` and ``source`` that are existing files or folders, and the value of any other key that is
an existing file (a ``templates`` file of an eval step, say); a folder named by another key is not walked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_json

STAMP_FORMAT = "mmfusion.recipe-step/1"


def path_stamp(path: str | os.PathLike) -> str:
    """A hash of the size and modification time of a file, or of every file under a folder."""
    path = Path(path).expanduser()
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    rows = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            try:
                st = os.stat(p)
            except OSError:  # removed while we looked
                continue
            rows.append(f"{os.path.relpath(p, path)}\t{st.st_size}\t{st.st_mtime_ns}\n")
    h.update("".join(rows).encode())
    return h.hexdigest()[:16]


@dataclass
class Fingerprint:
    """What a step's result depends on, and its hash."""

    commands: list[list[str]]  # the command lines, with other steps' outputs as @STEP
    inputs: dict[str, str] = field(default_factory=dict)  # @STEP -> its run id; a path of yours -> its stat stamp

    @property
    def digest(self) -> str:
        blob = json.dumps({"commands": self.commands, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


class StepState:
    """The stamp and the start marker of one step under ``OUT/reports``."""

    def __init__(self, reports: Path, name: str):
        self.stamp_path = reports / f"{name}.json"
        self.started_path = reports / f".{name}.started.json"

    def stamp(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.stamp_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == STAMP_FORMAT else None

    def started(self) -> dict[str, Any] | None:
        """The start marker of a run of the step that did not finish (or whose stamp is being written)."""
        try:
            data = json.loads(self.started_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def ours(self) -> bool:
        """Whether this recipe has run the step here (a stamp or a start marker), so its output is the runner's."""
        return self.stamp() is not None or self.started() is not None

    def begin(self, fp: Fingerprint) -> None:
        """Before the step writes or removes anything: its stamp goes, so an output cut short is never taken for a
        whole one, and a marker records the settings it runs with (an index cut short is built on only by a run with
        the same command lines)."""
        self.stamp_path.unlink(missing_ok=True)
        atomic_write_json(self.started_path, {"fingerprint": fp.digest, "inputs": fp.inputs, "commands": fp.commands})

    def finish(self, stamp: dict[str, Any]) -> None:
        atomic_write_json(self.stamp_path, {"format": STAMP_FORMAT, **stamp})
        self.started_path.unlink(missing_ok=True)


def why_stale(stamp: dict[str, Any] | None, fp: Fingerprint, started: dict[str, Any] | None) -> str | None:
    """Why a step must run (None: it is up to date)."""
    if stamp is None:
        return "cut short: running it again" if started else "not run yet"
    if stamp.get("fingerprint") == fp.digest:
        return None
    old_inputs = stamp.get("inputs", {})
    changed = [k for k in fp.inputs if old_inputs.get(k) != fp.inputs[k] and k in old_inputs]
    if stamp.get("commands") != fp.commands:
        return "settings changed: " + _command_diff(stamp.get("commands") or [], fp.commands)
    if changed:
        return "input changed: " + ", ".join(k.removeprefix("@") for k in changed)
    return "inputs changed"


def _options(commands: list[list[str]]) -> list[str]:
    """A command line's words grouped as they are read: ``--n 16``, ``--train.lr=1e-3``, a positional."""
    items = []
    for argv in commands:
        i = 0
        while i < len(argv):
            w = argv[i]
            if w.startswith("--") and "=" not in w and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                items.append(f"{w} {argv[i + 1]}")
                i += 2
            else:
                items.append(w)
                i += 1
    return items


def _command_diff(old: list[list[str]], new: list[list[str]]) -> str:
    """The options that changed, briefly: ``--time 3s -> --time 5s``."""
    a, b = _options(old), _options(new)
    gone = [w for w in a if w not in b]
    came = [w for w in b if w not in a]
    text = f"{', '.join(gone) or '(none)'} -> {', '.join(came) or '(none)'}"
    return text if len(text) < 100 else text[:97] + "..."
