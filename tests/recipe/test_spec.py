"""Reading a recipe: every mistake is an error naming the file, the line, the step and the fix, before any step
runs."""

from pathlib import Path

import pytest

from mmfusion.recipe import RecipeError, load_recipe
from mmfusion.recipe.runner import Runner, RunOptions

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
out: {out}
steps:
  - {{name: world, kind: data, source: shapes, test: 8}}
  - name: clip
    kind: train
    task: clip
    steps: 2
    init: {{whiten_patches: 0}}
  - {{name: eval, kind: eval, model: clip, data: world, reports: [retrieval], n: 8}}
  - {{name: index, kind: index, model: clip, paths: [world/test/images]}}
  - {{name: serve, kind: serve, db: index}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text.format(out=tmp_path / "out"))
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return str(e.value)


def test_a_good_recipe_reads_in_order_with_its_references(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.names() == ["world", "clip", "eval", "index", "serve"]
    clip = recipe.step("clip")
    assert clip.options["init.whiten_patches"] == 0  # a nested mapping is the dotted option
    assert recipe.step("serve").options["host"] == "127.0.0.1"  # never the network unless the recipe says so
    assert recipe.output(clip) == tmp_path / "out" / "clip"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("out: x\nstpes: []\n", ["r.yaml:2", "unknown key 'stpes'", "did you mean 'steps'"]),
        ("out: x\nsteps:\n  - {kind: trian, task: clip}\n", ["r.yaml:3", "kind 'trian'", "did you mean 'train'"]),
        ("steps:\n  - {kind: data}\n  - {kind: data}\n", ["r.yaml:3", "named 'data' too", "own 'name'"]),
        ("steps:\n  - {name: a, kind: eval, model: b}\n  - {name: b, kind: train, task: clip}\n",
         ["r.yaml:2", "names step 'b', which comes later", "move 'b' up"]),
        ("steps:\n  - {name: a, kind: index, model: a, paths: [x]}\n", ["names step 'a', which is this step"]),
        ("steps:\n  - {name: clip, kind: train, task: clip}\n  - {name: e, kind: eval, model: clp}\n",
         ["r.yaml:3", "'clp' is neither an earlier step (did you mean 'clip'?)"]),
        ("steps:\n  - name: t\n    kind: train\n    task: clip\n    out: elsewhere\n",
         ["r.yaml:5", "'out' is set by the recipe"]),
        ("steps:\n  - {kind: serve, port: 1}\n  - {kind: data}\n", ["serve runs until Ctrl-C", "last step"]),
        ("steps:\n  - {kind: data, kind: train}\n", ["r.yaml:2", "'kind' is written twice"]),
        ("steps: nothing\n", ["'steps' must be a list"]),
        ("steps:\n  - {name: reports, kind: data}\n", ["r.yaml:2", "'reports' is the recipe's own", "another 'name'"]),
        ("steps:\n  - {name: Summary, kind: data}\n", ["summary.json is the run's summary", "another 'name'"]),
    ],
)  # fmt: skip
def test_mistakes_name_the_line_and_the_fix(tmp_path, text, expected):
    message = _error(tmp_path, text)
    for part in expected:
        assert part in message, message


def test_a_step_key_is_its_commands_option_and_a_typo_is_caught_before_anything_runs(tmp_path):
    """Unknown keys are found by the command's own parser; a misspelt config option by the training's config."""
    for bad, expected in (
        ("    stpes: 2\n", ["r.yaml:7", "unknown key 'stpes'", "did you mean 'steps'", "mmfusion train --help"]),
        ("    train.lrr: 0.1\n", ["step 'clip' (train)", "train.lrr", "did you mean train.lr"]),
    ):
        text = GOOD.replace("    steps: 2\n", bad)
        recipe = load_recipe(_write(tmp_path, text))
        with pytest.raises(RecipeError) as e:
            Runner(recipe, RunOptions(dry_run=True)).run()
        for part in expected:
            assert part in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()  # nothing ran


def test_unknown_step_names_in_options_are_errors(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    for opts in (RunOptions(force=["clipp"]), RunOptions(only="evl"), RunOptions(until="nope")):
        with pytest.raises(RecipeError, match="no step named"):
            Runner(recipe, opts).selected()
    assert [s.name for s in Runner(recipe, RunOptions(until="eval")).selected()] == ["world", "clip", "eval"]
    assert [s.name for s in Runner(recipe, RunOptions(serve=False)).selected()][-1] == "index"


def test_the_example_recipes_are_valid(tmp_path):
    """Each step of recipes/*.yaml parses as its command would (the photo folder is stood in for)."""
    for name in ("shapes-demo.yaml", "photos.yaml"):
        recipe = load_recipe(REPO / "recipes" / name, out=tmp_path / name)
        if name == "photos.yaml":
            recipe.step("photos").options["source"] = str(tmp_path)
        runner = Runner(recipe, RunOptions(dry_run=True))
        from mmfusion.recipe import commands

        for step in recipe.steps:
            for argv in runner.commands_of(step)[0]:
                commands.check(recipe, step, argv)
        kinds = [s.kind.name for s in recipe.steps]
        assert kinds[0] == "data" and kinds[-1] == "serve" and "train" in kinds and "index" in kinds
    photos = load_recipe(REPO / "recipes" / "photos.yaml")
    assert {"export", "quantize", "eval"} <= {s.kind.name for s in photos.steps}


def test_out_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "r.yaml"
    path.write_text("out: ~/runs/x\nsteps:\n  - {name: world, kind: data}\n")
    recipe = load_recipe(path)
    assert recipe.out == tmp_path / "home" / "runs" / "x"
    assert recipe.output(recipe.step("world")) == tmp_path / "home" / "runs" / "x" / "world"
    assert load_recipe(path, out="~/y").out == tmp_path / "home" / "y"
