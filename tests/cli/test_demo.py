"""``mmfusion demo`` on a tiny budget: every step once (CLIP, captioner and VQA model trained, evaluated, served),
then the reuse that makes a second run start in seconds."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mmfusion.serve
from mmfusion.cli.main import main
from mmfusion.index import Index
from tests.utils import TINY_OVERRIDES

GALLERY = 24
# the demo's own flags, then mmfusion train's options for a model whose steps take milliseconds
TINY = [
    "--train.batch_size=8",
    "--train.threads=1",
    "--data.tokenizer_captions=200",
    *[f"--{o}" for o in TINY_OVERRIDES],
]
# the captioner's decoder as small; the VQA model is the captioner fine-tuned (its shape)
TINY_GENERATORS = [
    "--caption.train.batch_size=8",
    "--caption.train.threads=1",
    "--caption.model.decoder.width=32",
    "--caption.model.decoder.layers=1",
    "--caption.model.decoder.heads=2",
    "--caption.model.decoder.vocab_size=512",
    "--caption.model.decoder.context_length=24",
    "--vqa.train.batch_size=8",
    "--vqa.train.threads=1",
]
VIDEOS = 2
DEMO = ["-q", "demo", "--time", "6s", "--gallery", str(GALLERY), "--videos", str(VIDEOS), *TINY, *TINY_GENERATORS]
RUNS = ("clip", "caption", "vqa")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A demo directory after one full run with --no-serve, and that run's output."""
    out = tmp_path_factory.mktemp("demo")
    lines = _run_demo(out)
    return out, lines


def _run_demo(out, *extra: str) -> str:
    """The demo in a subprocess (it trains with every core and sets up logging: keep that out of pytest)."""
    cmd = [sys.executable, "-m", "mmfusion.cli.main", *DEMO, "--out", str(out), "--no-serve", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _images(db) -> int:
    with Index.open(db) as ix:
        return ix.store.count()


def test_demo_runs_every_step_and_indexes_the_gallery(built):
    out, stdout = built
    for step in range(1, 8):
        assert f"[{step}/7]" in stdout, stdout
    assert "budget 6s: clip 1s, caption 2s, vqa 2s" in stdout
    assert "training the CLIP" in stdout and "training the captioner" in stdout and "training the VQA" in stdout
    assert f"starting from {out / 'clip'}" in stdout and f"starting from {out / 'caption'}" in stdout
    assert f"{GALLERY + VIDEOS} added" in stdout and f"writing {VIDEOS} ShapesWorld videos" in stdout
    assert len(list((out / "video-gallery" / "videos").glob("*.mp4"))) == VIDEOS
    configs = {run: json.loads((out / run / "model" / "config.json").read_text()) for run in RUNS}
    assert configs["clip"]["family"] == "clip" and configs["caption"]["family"] == "captioner"
    assert configs["vqa"]["config"]["answers_questions"] is True  # the captioner fine-tuned on questions
    assert json.loads((out / "clip" / "eval" / "retrieval.json").read_text())["n_images"] == GALLERY
    assert json.loads((out / "caption" / "eval" / "captioning.json").read_text())["n"] == GALLERY
    vqa = json.loads((out / "vqa" / "eval" / "vqa.json").read_text())
    assert vqa["demo_n"] == 4 * GALLERY and 0 < vqa["n"] <= 4 * GALLERY
    assert "attribute accuracy" in stdout and "accuracy" in stdout
    assert _images(out / "index") == GALLERY + VIDEOS  # the gallery's images and the video gallery's videos
    serve = f"mmfusion serve --db {out / 'index'} --captioner {out / 'caption'} --answerer {out / 'vqa'}"
    assert "not serving (--no-serve)" in stdout and serve in stdout


def test_second_run_reuses_data_model_reports_and_index(built):
    out, _ = built
    weights = [out / run / "model" / "model.safetensors" for run in RUNS]
    before = [w.stat().st_mtime_ns for w in weights]
    stdout = _run_demo(out)
    assert "reusing ShapesWorld" in stdout and f"reusing the video gallery in {out / 'video-gallery'}" in stdout
    for what in ("CLIP", "captioner", "VQA model"):
        assert f"reusing the trained {what}" in stdout, stdout
    assert "training the" not in stdout and "evaluating" not in stdout
    assert "R@1" in stdout and "attribute accuracy" in stdout  # the stored reports, shown again
    assert f"{GALLERY + VIDEOS} unchanged" in stdout and "(0 images embedded)" in stdout
    assert [w.stat().st_mtime_ns for w in weights] == before
    assert _images(out / "index") == GALLERY + VIDEOS


def test_training_cut_short_resumes_from_its_checkpoint(built, tmp_path):
    """A run with checkpoints but no finished model (as Ctrl-C leaves it) continues rather than starting over."""
    out, _ = built
    run = tmp_path / "demo"
    shutil.copytree(out / "shapesworld", run / "shapesworld")
    shutil.copytree(out / "clip" / "checkpoints", run / "clip" / "checkpoints")
    stdout = _run_demo(run, "--train", "clip")
    assert "resuming the CLIP (search, zero-shot labels)'s training cut short at step-" in stdout
    assert "training the CLIP" not in stdout and "reusing ShapesWorld" in stdout
    assert "[3/7] not training the caption model" in stdout and not (run / "caption").exists()
    # the budget was spent before the cut: resuming adds no step, and the model is the one of the first run
    with (
        open(out / "clip" / "model" / "model.safetensors", "rb") as a,
        open(run / "clip" / "model" / "model.safetensors", "rb") as b,
    ):
        assert a.read() == b.read()
    assert _images(run / "index") == GALLERY + VIDEOS


def test_an_index_the_demo_did_not_build_is_never_removed(built, tmp_path):
    """A model mismatch rebuilds the demo's own index (its CLIP trained again), never one made with another model."""
    from tests.utils import tiny_clip

    out, _ = built
    run = tmp_path / "demo"
    for part in ("shapesworld", "clip", "caption", "vqa", "video-gallery"):
        shutil.copytree(out / part, run / part)
    with Index.open(run / "index", model=str(tiny_clip(tmp_path / "other", seed=3)), write=True) as ix:
        ix.update([out / "shapesworld" / "test" / "images"], progress=False)
    cmd = [sys.executable, "-m", "mmfusion.cli.main", *DEMO, "--out", str(run), "--no-serve"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "was not built by this demo: choose another --out" in done.stderr, done.stderr
    assert _images(run / "index") == GALLERY  # untouched


def test_busy_port_fails_before_any_work(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main([*DEMO, "--out", str(tmp_path / "demo"), "--port", str(port)]) == 2
    err = capsys.readouterr()
    assert f"port {port} on 127.0.0.1 is busy" in err.err and f"--port {port + 1}" in err.err
    assert "[1/7]" not in err.out and not (tmp_path / "demo").exists()


def test_demo_serves_the_page_and_stops_on_ctrl_c(built):
    out, _ = built
    cmd = [sys.executable, "-m", "mmfusion.cli.main", *DEMO, "--out", str(out), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, seen = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(seen)
            seen.append(line)
            if line.strip().startswith("open http://127.0.0.1:"):
                url = line.split()[1]
        assert url is not None, "".join(seen)
        with urllib.request.urlopen(url + "healthz", timeout=10) as r:
            health = json.load(r)
        assert (
            health["images"] == GALLERY
            and health["videos"] == VIDEOS
            and "red circle" in health["labels"]
            and len(health["labels"]) == 48
        )
        assert health["captioner"] and health["answerer"]  # the demo's own, trained above
        with urllib.request.urlopen(url + "models", timeout=10) as r:
            cards = {c["role"]: c for c in json.load(r)["models"]}
        assert set(cards) == {"embedder", "captioner", "answerer"}
        assert cards["captioner"]["family"] == "captioner" and cards["captioner"]["training"]["step"] > 0
        tasks = {m["task"] for c in cards.values() for m in c["metrics"]}
        assert tasks == {"retrieval", "zeroshot", "caption", "vqa"}, cards
        with urllib.request.urlopen(url + "models/answerer/curve.png", timeout=10) as r:
            assert r.headers["content-type"] == "image/png" and r.read(8) == b"\x89PNG\r\n\x1a\n"
        if (Path(mmfusion.serve.__file__).parent / "static" / "index.html").is_file():
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200 and "text/html" in r.headers["content-type"]
        else:  # a checkout without the page: the service says so rather than failing
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(url, timeout=10)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0 and "stopped" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--port", "--no-serve", "--gallery", "--captioner", "--answerer", "--time", "--out", "--train"):
        assert flag in out, flag
    assert "later release" not in out and "--caption.train.lr" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train", "clip,vqa"], "add caption"),
        (["--train", "caption"], "keep clip"),
        (["--train", "clip,blip"], "choose from clip, caption, vqa"),
    ],
)
def test_bad_model_choices_fail_before_any_work(tmp_path, capsys, flags, message):
    assert main([*DEMO, "--out", str(tmp_path / "demo"), "--no-serve", *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_the_budget_is_shared_by_the_models_trained():
    from mmfusion.cli.demo_steps import STAGES, budgets, duration

    assert {k: duration(v) for k, v in budgets(720, list(STAGES)).items()} == {
        "clip": "2m24s", "caption": "4m48s", "vqa": "4m48s"}  # fmt: skip
    assert budgets(60, [STAGES[0]]) == {"clip": 60}  # the CLIP alone gets it all


def test_options_go_to_the_model_they_name():
    from mmfusion.cli.demo_steps import split_options

    got = split_options(["--train.lr=1", "--caption.train.lr=2", "--vqa.vqa.caption_share=1", "--clip.model.x=3"])
    assert got == {"clip": ["--train.lr=1", "--model.x=3"], "caption": ["--train.lr=2"],
                   "vqa": ["--vqa.caption_share=1"]}  # fmt: skip
    # a value as the next word stays with its flag's model
    got = split_options(["--caption.train.lr", "1e-3", "--train.steps", "5", "--vqa.train.lr", "2"])
    assert got == {"clip": ["--train.steps", "5"], "caption": ["--train.lr", "1e-3"], "vqa": ["--train.lr", "2"]}
