"""What the runner may remove, and how a stop is told from a failure: a folder the recipe did not write is never
removed, a kill while an old output is removed never leaves a stamp beside it, Ctrl-C caught by a command is a stop,
and an index cut short is built on only by a run with its settings. Commands are stubs here (no model runs)."""

import json
from pathlib import Path

import pytest

from mmfusion.recipe import RecipeError, RunOptions, load_recipe, run_recipe
from mmfusion.recipe import commands as recipe_commands
from mmfusion.recipe import runner as recipe_runner
from mmfusion.recipe.runner import Runner
from mmfusion.recipe.state import StepState

DATA = "out: {out}\nsteps:\n  - {{name: world, kind: data, source: shapes, test: {test}}}\n"
INDEX = DATA + "  - {{name: index, kind: index, model: hf:org/clip, paths: [world], chunk: {chunk}}}\n"


class Stub:
    """Stands for the commands: each writes a file into its output folder (what it found there is recorded), and
    ``result[command]`` says what it does then: an exit status, or an exception to raise."""

    def __init__(self, monkeypatch):
        self.result: dict[str, object] = {}
        self.found: list[list[str]] = []  # per call, the files its output held when it started
        monkeypatch.setattr(recipe_commands, "run", self)
        monkeypatch.setattr(recipe_runner, "step_metrics", lambda *a, **k: {})

    def __call__(self, argv, quiet, verbose):
        out = Path(argv[argv.index("--db" if argv[0] == "index" else "--out") + 1])
        self.found.append(sorted(p.name for p in out.iterdir()) if out.is_dir() else [])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"part{len(self.found)}").write_text("x")
        result = self.result.get(argv[0], 0)
        if isinstance(result, BaseException):
            raise result
        return result


def _recipe(tmp_path: Path, text: str = DATA, **settings) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text.format(out=tmp_path / "out", **{"test": 8, "chunk": 16, **settings}))
    return path


def test_a_folder_the_recipe_did_not_write_is_never_removed(tmp_path, monkeypatch):
    stub = Stub(monkeypatch)
    mine = tmp_path / "out" / "world" / "thesis.tex"  # as `--out ~` would meet ~/world
    mine.parent.mkdir(parents=True)
    mine.write_text("years of work")
    recipe = load_recipe(_recipe(tmp_path))
    for opts in (RunOptions(), RunOptions(force=["world"]), RunOptions(dry_run=True)):
        with pytest.raises(RecipeError, match=r"out/world exists and was not written by this recipe.*remove it or "):
            run_recipe(recipe, opts)
    assert mine.read_text() == "years of work" and stub.found == []  # nothing ran, nothing was removed
    # a folder the runner wrote (its stamp says so) is replaced when the step runs again
    mine.unlink()
    mine.parent.rmdir()
    run_recipe(recipe, RunOptions())
    run_recipe(load_recipe(_recipe(tmp_path, test=9)), RunOptions())
    assert stub.found == [[], []] and sorted(p.name for p in mine.parent.iterdir()) == ["part2"]


def test_a_kill_while_the_old_output_is_removed_leaves_no_stamp(tmp_path, monkeypatch):
    Stub(monkeypatch)
    run_recipe(load_recipe(_recipe(tmp_path)), RunOptions())
    state = StepState(tmp_path / "out" / "reports", "world")
    assert state.stamp() is not None

    def killed(path, *a, **k):
        assert state.stamp() is None and state.started() is not None  # begun before anything is removed
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_runner.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(_recipe(tmp_path)), RunOptions(force=["world"]))
    assert state.stamp() is None and state.ours()  # so the next run sees a step cut short, and may clear it


@pytest.mark.parametrize("status", [130, 143])
def test_a_command_stopped_by_a_signal_is_a_stop_not_a_failure(tmp_path, monkeypatch, capsys, status):
    stub = Stub(monkeypatch)
    stub.result["data"] = status  # what `mmfusion index` returns after Ctrl-C or SIGTERM
    with pytest.raises(KeyboardInterrupt, match="step 'world' stopped; run the recipe again to continue") as e:
        run_recipe(load_recipe(_recipe(tmp_path)), RunOptions())
    assert "Fix it" not in str(e.value)
    summary = json.loads((tmp_path / "out" / "reports" / "summary.json").read_text())
    assert summary[-1]["status"] == "stopped"
    stub.result["data"] = 3  # any other status is a failure
    with pytest.raises(RuntimeError, match="failed with exit status 3.*Fix it"):
        run_recipe(load_recipe(_recipe(tmp_path)), RunOptions())


def test_an_index_cut_short_is_built_on_only_with_the_same_settings(tmp_path, monkeypatch):
    stub = Stub(monkeypatch)
    stub.result["index"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt, match="the index keeps what it committed"):
        run_recipe(load_recipe(_recipe(tmp_path, INDEX)), RunOptions())
    marker = StepState(tmp_path / "out" / "reports", "index").started()
    assert marker["commands"][0][0] == "index"  # the settings the partial index was made with
    with pytest.raises(KeyboardInterrupt):  # the same settings: it goes on from what it committed
        run_recipe(load_recipe(_recipe(tmp_path, INDEX)), RunOptions())
    assert stub.found[-1] == ["part2"]
    stub.result["index"] = 0  # other settings: the partial index is not built on
    run_recipe(load_recipe(_recipe(tmp_path, INDEX, chunk=32)), RunOptions())
    assert stub.found[-1] == []


def test_a_file_named_by_any_option_is_an_input(tmp_path):
    templates = tmp_path / "prompts.txt"
    templates.write_text("a photo of a {}.\n")
    (tmp_path / "sub").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(f"out: {tmp_path / 'out'}\nsteps:\n  - {{name: e, kind: eval, model: hf:org/clip, data: shapes, "
                    f"templates: {templates}, split: {tmp_path / 'sub'}}}\n")  # fmt: skip
    recipe = load_recipe(path)
    runner = Runner(recipe, RunOptions())
    step = recipe.step("e")
    fp = runner.fingerprint(step, runner.commands_of(step)[1])
    assert str(templates) in fp.inputs and str(tmp_path / "sub") not in fp.inputs  # a folder is walked for refs only
    templates.write_text("a drawing of a {}.\n")
    assert runner.fingerprint(step, runner.commands_of(step)[1]).digest != fp.digest


def test_a_stamp_reader_takes_only_a_stamp(tmp_path):
    (tmp_path / "summary.json").write_text("[]")  # what the runner writes there, were a step named so
    (tmp_path / ".x.started.json").write_text('"text"')
    assert StepState(tmp_path, "summary").stamp() is None and not StepState(tmp_path, "x").ours()
