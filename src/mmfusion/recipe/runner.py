"""Run a recipe: each selected step in order, skipped when its stamp says it is up to date, else run as its
mmfusion command in this process, then stamped; a summary table at the end (and before serving).

A training cut short resumes from its checkpoint when its settings are the same; an index is updated in place when
only your folder changed (a new model rebuilds it); every other step's old output is removed before it runs again.
Only what this recipe wrote is removed (the step's stamp or start marker says so): a folder of yours at OUT/STEP stops
the run before any step runs. A command stopped by Ctrl-C or SIGTERM (exit 130 or 143) stops the recipe as Ctrl-C
does: a stop to run again, not a failure to fix.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import commands
from .metrics import format_metrics, step_metrics
from .spec import Recipe, RecipeError, Step, is_shapes, referenced_step
from .state import Fingerprint, StepState, path_stamp, why_stale

INTERRUPTED = (130, 143)  # a command's exit status after Ctrl-C or SIGTERM (128 + the signal), as shells give it
# what a step of each policy does when the recipe runs again after it was stopped
RESUMES = {
    "resume": " (the training resumes from its last checkpoint)",
    "incremental": " (the index keeps what it committed and goes on from there)",
}


@dataclass
class RunOptions:
    """What ``mmfusion run`` was asked to do besides running every step."""

    force: list[str] = field(default_factory=list)  # steps run even when up to date
    only: str | None = None  # run this step alone (the steps it reads must have run)
    until: str | None = None  # stop after this step
    serve: bool = True  # False: stop before the serve step
    dry_run: bool = False  # say what would run and why, run nothing
    quiet: bool = False
    verbose: bool = False


@dataclass
class Outcome:
    """One row of the summary."""

    step: str
    kind: str
    status: str  # ran, skipped, would run, serving
    why: str = ""
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, recipe: Recipe, opts: RunOptions):
        self.recipe, self.opts = recipe, opts
        self.reports = recipe.out / "reports"
        self.run_ids: dict[str, str | None] = {}  # step -> run id (None: would run, in a dry run)
        self.outcomes: list[Outcome] = []
        self.waits_for = ""  # in a dry run: the step that runs first, which a step's fingerprint waits for

    # ---- the plan -------------------------------------------------------------------------------------------

    def selected(self) -> list[Step]:
        steps = self.recipe.steps
        for name in self.opts.force:
            self.recipe.step(name)  # an unknown name is an error that lists the steps
        if self.opts.until:
            steps = steps[: steps.index(self.recipe.step(self.opts.until)) + 1]
        if self.opts.only:
            steps = [self.recipe.step(self.opts.only)]
        return [s for s in steps if self.opts.serve or s.kind.name != "serve"]

    def resolve(self, value: Any) -> str:
        """A step's output path for a reference, else the value as written (a path of yours, 'shapes', hf:...)."""
        hit = referenced_step(value, self.recipe.names())
        if hit is None:
            return str(Path(value).expanduser()) if isinstance(value, str) and value.startswith("~") else str(value)
        base = self.recipe.output(self.recipe.step(hit[0]))
        return str(base / hit[1]) if hit[1] else str(base)

    def symbolic(self, value: Any) -> str:
        hit = referenced_step(value, self.recipe.names())
        return f"@{value}" if hit else str(value)

    def commands_of(self, step: Step) -> tuple[list[list[str]], list[list[str]]]:
        """(the command lines that run, the same with other steps' outputs as @STEP for the fingerprint)."""
        real = commands.step_commands(self.recipe, step, self.resolve, self.reports)
        sym = commands.step_commands(self.recipe, step, self.symbolic, self.reports)
        out, root = str(self.recipe.output(step)), str(self.recipe.out)
        sym = [[("@" + step.name if w == out else w.replace(root + "/", "@OUT/", 1)) for w in c] for c in sym]
        return real, sym

    def fingerprint(self, step: Step, sym: list[list[str]]) -> Fingerprint | None:
        """The step's fingerprint, or None when a step it reads will run first (a dry run cannot know it)."""
        inputs: dict[str, str] = {}
        reads = commands.references(self.recipe, step)
        for name in reads:
            if name not in self.run_ids and (stamp := StepState(self.reports, name).stamp()) is not None:
                self.run_ids[name] = stamp["run_id"]
        missing = [n for n in reads if n not in self.run_ids]
        if missing:
            raise RecipeError(
                f"{step.where(self.recipe.path)} reads {', '.join(map(repr, missing))}, which "
                f"{'has' if len(missing) == 1 else 'have'} not finished: run "
                f"`mmfusion run {self.recipe.path} --until {missing[-1]}` first (or leave out --only)"
            )
        for name in reads:
            if self.run_ids[name] is None:
                self.waits_for = name
                return None
            inputs["@" + name] = str(self.run_ids[name])
        for key, values in step.options.items():  # files and folders of yours (see state.py for which)
            walk = key in (*step.kind.refs, "config", "source")
            for v in values if isinstance(values, list) else [values]:
                if not isinstance(v, str) or v == "shapes" or referenced_step(v, self.recipe.names()):
                    continue
                path = Path(v).expanduser()
                if path.is_file() or (walk and path.exists()):
                    inputs[v] = path_stamp(v)  # its stat
        return Fingerprint(sym, inputs)

    # ---- running --------------------------------------------------------------------------------------------

    def run(self) -> list[Outcome]:
        steps = self.selected()
        planned = [(s, *self.commands_of(s)) for s in steps]
        for step, real, _ in planned:  # every command line parsed before anything runs
            for argv in real:
                commands.check(self.recipe, step, argv)
            if step.kind.name == "data" and not is_shapes(step):
                _check_folder(self.recipe, step)
            self._check_ours(step, StepState(self.reports, step.name))
        serve = next((s for s in steps if s.kind.name == "serve"), None)
        if serve is not None and not self.opts.dry_run:
            self._check_port(serve)
        for step, real, sym in planned:
            if step.kind.name == "serve" and self.opts.dry_run:
                self._say(step, "would serve", "runs until Ctrl-C", real)
                self.summary()
                continue
            if step.kind.name == "serve":
                self.summary()
                self.outcomes.append(Outcome(step.name, "serve", "serving"))
                self._serve(step, real)
                continue
            self._step(step, real, sym)
        if serve is None:
            self.summary()
        return self.outcomes

    def _step(self, step: Step, real: list[list[str]], sym: list[list[str]]) -> None:
        state = StepState(self.reports, step.name)
        fp = self.fingerprint(step, sym)
        stamp = state.stamp()
        if fp is None:
            why: str | None = f"after {self.waits_for!r}, which it reads, runs"
        elif step.name in self.opts.force:
            why = "forced (--force)"
        else:
            why = why_stale(stamp, fp, state.started())
            if why is None and not self.recipe.output(step).exists():
                why = f"its output {self.recipe.output(step)} is gone"
        if why is None:
            assert stamp is not None
            self.run_ids[step.name] = stamp["run_id"]
            self.outcomes.append(Outcome(step.name, step.kind.name, "skipped", "up to date",
                                         metrics=stamp.get("metrics", {})))  # fmt: skip
            print(f"[{step.name}] up to date, skipped ({format_metrics(stamp.get('metrics', {})) or 'no metrics'})")
            return
        if self.opts.dry_run:
            self.run_ids[step.name] = None
            self._say(step, "would run", why, real)
            return
        assert fp is not None
        self._execute(step, real, fp, state, why)

    def _execute(self, step: Step, real: list[list[str]], fp: Fingerprint, state: StepState, why: str) -> None:
        real, clear = self._prepare(step, real, fp, state)  # read what the last run left before it changes
        print(f"[{step.name}] running ({why})", flush=True)
        state.begin(fp)  # the stamp goes first: a kill while the old output is removed leaves a step cut short
        if clear:
            shutil.rmtree(self.recipe.output(step))
        t0 = time.perf_counter()
        try:
            for argv in real:
                print(f"  $ {commands.shell(argv)}", flush=True)
                rc = commands.run(argv, self.opts.quiet, self.opts.verbose)
                if rc in INTERRUPTED:  # the command caught Ctrl-C or SIGTERM itself (mmfusion index)
                    raise KeyboardInterrupt
                if rc:
                    raise RuntimeError(self._failed(step, rc))
        except KeyboardInterrupt:
            self._stopped(step, "stopped", t0)
            resume = RESUMES.get(step.kind.policy, "")
            raise KeyboardInterrupt(f"step {step.name!r} stopped; run the recipe again to continue{resume}") from None
        except Exception:
            self._stopped(step, "failed", t0)
            raise
        seconds = time.perf_counter() - t0
        out = self.recipe.output(step)
        metrics = step_metrics(step.kind.name, out, is_folder=step.kind.name == "data" and not is_shapes(step))
        run_id = fp.inputs.get(str(step.options.get("source"))) if step.kind.name == "data" else None
        run_id = run_id or uuid.uuid4().hex[:16]  # your folder's run id is its stat: readers re-run when it changes
        state.finish({
            "step": step.name, "kind": step.kind.name, "fingerprint": fp.digest, "run_id": run_id,
            "commands": fp.commands, "inputs": fp.inputs, "output": str(out), "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics, "reports": _reports(step, out),
        })  # fmt: skip
        self.run_ids[step.name] = run_id
        self.outcomes.append(Outcome(step.name, step.kind.name, "ran", why, seconds, metrics))
        print(f"[{step.name}] done in {seconds:.1f}s{': ' + format_metrics(metrics) if metrics else ''}", flush=True)

    def _prepare(
        self, step: Step, real: list[list[str]], fp: Fingerprint, state: StepState
    ) -> tuple[list[list[str]], bool]:
        """What a re-run builds on, read before the run begins: the command lines to run (resuming a training), and
        whether the old output must be removed first (the caller does it after ``state.begin``)."""
        out = self.recipe.output(step)
        if step.kind.name == "data" and not is_shapes(step):
            return real, False  # your folder: read, never written
        self._check_ours(step, state)
        previous = state.started() or state.stamp() or {}
        if step.kind.policy == "resume":
            from ..train.checkpoint import latest_checkpoint

            same = previous.get("fingerprint") == fp.digest and state.stamp() is None
            if same and latest_checkpoint(out / "checkpoints") is not None:
                print(f"[{step.name}] resuming the training cut short in {out}")
                return [[*argv, "--resume"] + (["--train.progress=false"] if self.opts.quiet else [])
                        for argv in real], False  # fmt: skip
        elif step.kind.policy == "incremental":  # an index: kept when its model and settings are the same
            model = step.options.get("model")
            hit = referenced_step(model, self.recipe.names())
            key = f"@{hit[0]}" if hit else str(model)  # a step's run id, or the stat of a model of yours
            inputs = previous.get("inputs")
            same_model = isinstance(inputs, dict) and inputs.get(key) == fp.inputs.get(key)
            if same_model and previous.get("commands") == fp.commands and out.exists():
                return real, False  # only the files changed: the index updates in place (unchanged files cost a stat)
        quiet = ["--train.progress=false"] if self.opts.quiet and step.kind.name == "train" else []
        return [[*argv, *quiet] for argv in real], out.exists()

    def _check_ours(self, step: Step, state: StepState) -> None:
        """A step's output that exists must be this recipe's (its stamp or start marker says the runner wrote it):
        the runner removes it before running the step again, so a folder of yours there is an error, never lost."""
        out = self.recipe.output(step)
        if step.kind.output_flag is None or (step.kind.name == "data" and not is_shapes(step)):
            return
        if not (out.exists() or out.is_symlink()):
            return
        if not state.ours():
            raise RecipeError(f"{step.where(self.recipe.path)}: {out} exists and was not written by this recipe (no "
                              f"stamp or start marker in {self.reports}); remove it or choose another out")  # fmt: skip
        if out.is_symlink() or not out.resolve().is_relative_to(self.recipe.out.resolve()):
            raise RecipeError(f"{step.where(self.recipe.path)}: {out} leads to {out.resolve()} (a link); remove the "
                              "link: the step writes a folder of its own there")  # fmt: skip

    def _stopped(self, step: Step, status: str, t0: float) -> None:
        """A step that did not finish: its row, then the table of the run so far (its stamp stays absent)."""
        self.outcomes.append(Outcome(step.name, step.kind.name, status, seconds=time.perf_counter() - t0))
        self.summary()

    def _failed(self, step: Step, rc: int) -> str:
        if step.kind.name == "quantize":
            return (f"step {step.name!r}: the quality gate refused the quantised model (above; report in "
                    f"{self.reports / (step.name + '.gate.json')}); give the step a larger max_drop, try mode: static "
                    "with calibration: FOLDER, or remove the step and serve the fp32 export")  # fmt: skip
        return (f"step {step.name!r} ({step.kind.name}) failed with exit status {rc} (the error is above); the steps "
                "after it did not run. Fix it and run again: finished steps are skipped")  # fmt: skip

    def _check_port(self, step: Step) -> None:
        from ..cli.common import listen_socket

        listen_socket(int(step.options.get("port", 8000)), str(step.options.get("host", "127.0.0.1"))).close()

    def _serve(self, step: Step, real: list[list[str]]) -> None:
        print(f"[{step.name}] serving on http://{step.options.get('host')}:{step.options.get('port', 8000)}/ "
              "(Ctrl-C stops it)", flush=True)  # fmt: skip
        rc = commands.run(real[0], self.opts.quiet, self.opts.verbose)
        if rc and rc not in INTERRUPTED:
            raise RuntimeError(self._failed(step, rc))
        print(f"[{step.name}] stopped; run the recipe again to serve in seconds (the steps up to date are skipped)")

    def _say(self, step: Step, what: str, why: str, real: list[list[str]]) -> None:
        self.outcomes.append(Outcome(step.name, step.kind.name, what, why))
        print(f"[{step.name}] {what}: {why}")
        for argv in real:
            print(f"  $ {commands.shell(argv)}")

    # ---- the summary ----------------------------------------------------------------------------------------

    def summary(self) -> None:
        rows = [(o.step, o.kind, o.status, f"{o.seconds:.1f}s" if o.seconds else "-",
                 format_metrics(o.metrics)) for o in self.outcomes]  # fmt: skip
        head = ("step", "kind", "status", "time", "key metrics")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        print()
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        if not self.opts.dry_run:
            from ..utils.io import atomic_write_json

            atomic_write_json(self.reports / "summary.json", [o.__dict__ for o in self.outcomes])
            print(f"reports: {self.reports}/ (one JSON per step, summary.json)")


def _reports(step: Step, out: Path) -> list[str]:
    """The report files a step's command wrote into its output (eval reports, the quantize report, metrics)."""
    if step.kind.name == "data" or not out.is_dir():
        return []
    return sorted(str(p) for p in out.iterdir() if p.suffix in (".json", ".jsonl") and p.name != "config.json")


def _check_folder(recipe: Recipe, step: Step) -> None:
    """A data step of your folder: it must hold captioned images (or be a folder at all, for indexing)."""
    root = recipe.output(step)
    if not root.is_dir():
        raise RecipeError(f"{step.where(recipe.path, 'source')}: {root} is not a folder; set source to your folder "
                          "of images with captions.jsonl beside them (or in train/ and test/)")  # fmt: skip


def run_recipe(recipe: Recipe, opts: RunOptions) -> list[Outcome]:
    """Run (or with ``dry_run`` plan) a recipe; the outcome of each step considered, in order."""
    return Runner(recipe, opts).run()
