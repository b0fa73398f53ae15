"""``mmfusion run`` end to end on a tiny recipe: every step once, then nothing again; a changed setting re-runs that
step and the steps that read it only; a step cut short is never taken for a finished one."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmfusion.recipe import RunOptions, load_recipe, run_recipe
from mmfusion.recipe import commands as recipe_commands
from tests.utils import TINY_OVERRIDES

GALLERY = 12
MODEL = "".join(f"    {o.split('=')[0]}: {o.split('=')[1]}\n" for o in TINY_OVERRIDES)  # model.embed_dim: 16, ...
RECIPE = f"""\
out: {{out}}
steps:
  - {{{{name: world, kind: data, source: shapes, train: 0, test: {GALLERY}, heldout: 0, zeroshot_per_class: 0}}}}
  - name: clip
    kind: train
    task: clip
    steps: {{steps}}
    train: {{{{batch_size: 8, threads: 1, warmup_steps: 1, save_every: 2}}}}
    data.tokenizer_captions: 200
{MODEL}  - {{{{name: eval, kind: eval, model: clip, data: world, reports: [retrieval], n: {{n}}}}}}
  - {{{{name: index, kind: index, model: clip, paths: [world/test/images]}}}}
  - {{{{name: serve, kind: serve, db: index, port: {{port}}}}}}
"""


def write_recipe(path: Path, out: Path, steps: int = 3, n: int = GALLERY, port: int = 8000) -> Path:
    path.write_text(RECIPE.format(out=out, steps=steps, n=n, port=port))
    return path


def run_cli(recipe: Path, *extra: str) -> str:
    """The recipe in a subprocess (training sets the process's threads and logging: keep that out of pytest)."""
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "-q", "run", str(recipe), "--no-serve", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def statuses(stdout: str) -> dict[str, str]:
    """step -> ran / skipped, from the lines each step prints."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("[") and "] " in line:
            name, rest = line[1:].split("] ", 1)
            if rest.startswith("up to date"):
                found[name] = "skipped"
            elif rest.startswith("running"):
                found[name] = "ran"
            elif rest.startswith("would run"):
                found[name] = "would run"
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A recipe's OUT after one full run (--no-serve), and that run's output."""
    root = tmp_path_factory.mktemp("recipe")
    recipe = write_recipe(root / "tiny.yaml", root / "out")
    return recipe, root / "out", run_cli(recipe)


def _copy(built, tmp_path: Path, **settings) -> tuple[Path, Path]:
    """A copy of the built OUT with its recipe (the stamps hold no absolute paths: OUT can move)."""
    _, out, _ = built
    shutil.copytree(out, tmp_path / "out")
    return write_recipe(tmp_path / "tiny.yaml", tmp_path / "out", **settings), tmp_path / "out"


def test_first_run_runs_every_step_and_keeps_each_report(built):
    _, out, stdout = built
    assert statuses(stdout) == {"world": "ran", "clip": "ran", "eval": "ran", "index": "ran"}
    for step in ("world", "clip", "eval", "index"):
        stamp = json.loads((out / "reports" / f"{step}.json").read_text())
        assert (
            stamp["step"] == step and stamp["fingerprint"] and not (out / "reports" / f".{step}.started.json").exists()
        )
    eval_stamp = json.loads((out / "reports" / "eval.json").read_text())
    assert str(out / "eval" / "retrieval.json") in eval_stamp["reports"] and "i2t R@1" in eval_stamp["metrics"]
    assert json.loads((out / "eval" / "retrieval.json").read_text())["n_images"] == GALLERY
    assert json.loads((out / "reports" / "index.json").read_text())["metrics"] == {"images": GALLERY}
    summary = json.loads((out / "reports" / "summary.json").read_text())
    assert [(r["step"], r["status"]) for r in summary] == [(s, "ran") for s in ("world", "clip", "eval", "index")]
    table = stdout[stdout.index("step  ") :]
    assert "key metrics" in table and "t2i R@1" in table and f"images {GALLERY}" in table
    assert "serve" not in statuses(stdout)  # --no-serve


def test_second_run_skips_every_step(built):
    recipe, out, _ = built
    weights = out / "clip" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    stdout = run_cli(recipe)
    assert statuses(stdout) == {"world": "skipped", "clip": "skipped", "eval": "skipped", "index": "skipped"}
    assert "$ mmfusion" not in stdout and weights.stat().st_mtime_ns == before


def test_a_changed_setting_reruns_that_step_and_its_readers_only(built, tmp_path, capsys):
    # eval's n: only eval (index reads the model, not the evaluation)
    recipe, out = _copy(built, tmp_path / "a", n=6)
    run_recipe(load_recipe(recipe), RunOptions(dry_run=True, serve=False))
    said = capsys.readouterr().out
    assert statuses(said) == {"world": "skipped", "clip": "skipped", "eval": "would run", "index": "skipped"}
    assert "settings changed: --n 12 -> --n 6" in said
    # the training's length: the training, then eval and index, which read it; not the data
    recipe, out = _copy(built, tmp_path / "b", steps=4)
    stdout = run_cli(recipe)
    assert statuses(stdout) == {"world": "skipped", "clip": "ran", "eval": "ran", "index": "ran"}
    assert "--steps 3 -> --steps 4" in stdout and "resuming" not in stdout
    assert json.loads((out / "reports" / "clip.json").read_text())["metrics"]["step"] == 4


def test_a_step_cut_short_is_not_taken_for_a_finished_one(built, tmp_path, monkeypatch, capsys):
    recipe, out = _copy(built, tmp_path, n=6)
    real_run = recipe_commands.run

    def cut_short(argv, quiet, verbose):
        if argv[0] == "eval":  # half a report written, then Ctrl-C
            (out / "eval").mkdir(parents=True, exist_ok=True)
            (out / "eval" / "retrieval.json").write_text('{"task": "retr')
            raise KeyboardInterrupt
        return real_run(argv, quiet, verbose)

    monkeypatch.setattr(recipe_commands, "run", cut_short)
    with pytest.raises(KeyboardInterrupt, match="step 'eval' stopped; run the recipe again"):
        run_recipe(load_recipe(recipe), RunOptions(serve=False, quiet=True))
    assert not (out / "reports" / "eval.json").exists()  # the old stamp went before the step began
    capsys.readouterr()
    run_recipe(load_recipe(recipe), RunOptions(dry_run=True, serve=False))
    said = capsys.readouterr().out
    assert "[eval] would run: cut short" in said
    # and the same settings as the finished run do not bring the old stamp back: it is gone for good
    write_recipe(recipe, out)
    run_recipe(load_recipe(recipe), RunOptions(dry_run=True, serve=False))
    assert "[eval] would run: cut short" in capsys.readouterr().out


def test_a_training_cut_short_resumes_from_its_checkpoint(built, tmp_path):
    """Checkpoints and a start marker but no stamp (as Ctrl-C leaves it): the training continues, not restarts."""
    recipe, out = _copy(built, tmp_path)
    stamp = json.loads((out / "reports" / "clip.json").read_text())
    (out / "reports" / ".clip.started.json").write_text(json.dumps({"fingerprint": stamp["fingerprint"]}))
    (out / "reports" / "clip.json").unlink()
    shutil.rmtree(out / "clip" / "model")
    stdout = run_cli(recipe)
    assert "resuming the training cut short" in stdout and "[clip] running (cut short" in stdout
    assert statuses(stdout) == {"world": "skipped", "clip": "ran", "eval": "ran", "index": "ran"}
    with (
        open(built[1] / "clip" / "model" / "model.safetensors", "rb") as a,
        open(out / "clip" / "model" / "model.safetensors", "rb") as b,
    ):
        assert a.read() == b.read()  # the budget was spent before the cut: resuming adds no step


def test_force_reruns_a_step_and_its_readers(built, tmp_path, capsys):
    recipe, _ = _copy(built, tmp_path)
    run_recipe(load_recipe(recipe), RunOptions(dry_run=True, serve=False, force=["world"]))
    said = capsys.readouterr().out
    assert statuses(said) == {"world": "would run", "clip": "skipped", "eval": "would run", "index": "would run"}
    assert "forced (--force)" in said and "after 'world', which it reads, runs" in said


def test_only_needs_the_steps_it_reads(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out"))
    with pytest.raises(ValueError, match="reads 'world', 'clip', which have not finished.*--until clip"):
        run_recipe(recipe, RunOptions(only="eval", dry_run=True))


def test_a_busy_port_fails_before_any_step_runs(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out", port=port))
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is busy"):
            run_recipe(recipe, RunOptions())
    assert not (tmp_path / "out").exists()


def test_help_shows_the_format_and_examples(capsys):
    from mmfusion.cli.main import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for part in ("--dry-run", "--force", "--only", "--until", "--no-serve", "kind: train", "recipes/photos.yaml"):
        assert part in out, part


def test_a_changed_folder_of_yours_reruns_what_reads_it_and_the_index_updates_in_place(built, tmp_path, capsys):
    from tests.utils import write_png

    folder = tmp_path / "photos"
    for i in range(3):
        write_png(folder / f"{i}.png", colour=(60 * i, 30, 200))
    recipe = tmp_path / "photos.yaml"
    recipe.write_text(
        f"out: {tmp_path / 'out'}\nsteps:\n  - {{name: photos, kind: data, source: {folder}}}\n"
        f"  - {{name: index, kind: index, model: {built[1] / 'clip'}, paths: [photos]}}\n"
    )
    run_recipe(load_recipe(recipe), RunOptions(quiet=True))
    assert statuses(capsys.readouterr().out) == {"photos": "ran", "index": "ran"}
    run_recipe(load_recipe(recipe), RunOptions(quiet=True))
    assert statuses(capsys.readouterr().out) == {"photos": "skipped", "index": "skipped"}
    write_png(folder / "3.png", colour=(10, 200, 10))
    run_recipe(load_recipe(recipe), RunOptions(quiet=True))
    said = capsys.readouterr().out
    assert statuses(said) == {"photos": "ran", "index": "ran"} and "input changed: photos" in said
    assert "1 added" in said and "3 unchanged" in said  # updated in place, not rebuilt
    assert json.loads((tmp_path / "out" / "reports" / "index.json").read_text())["metrics"] == {"images": 4}
