"""`mmfusion caption` and `mmfusion ask` with mmfusion's own runs: a captioner, a generative VQA model and a VQA
classifier. Random weights say arbitrary words, so the output is compared with the loaded run's own calls."""

import json

import pytest

import mmfusion
from mmfusion.cli.main import main
from tests.tiny_generators import ANSWERS, tiny_generators
from tests.utils import (
    one_thread,  # noqa: E402, F401  (autouse: one torch thread)
    photo,
    tiny_clip,
)

QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_generators(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="module")
def models(runs):
    return {k: mmfusion.load(str(p)) for k, p in runs.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    return [str(photo(root / f"p{i}.png", seed=i)) for i in range(3)]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["-q", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def captions(capsys, *args) -> list[str]:
    code, out, err = run(capsys, "caption", *args, "--json")
    assert code == 0, err
    return [r["caption"] for r in json.loads(out)]


@pytest.mark.parametrize("kind", ["caption", "genvqa"])  # a generative VQA run captions too
def test_caption_prints_the_runs_own_greedy_captions(capsys, runs, models, images, kind):
    want = models[kind].caption(images)
    assert captions(capsys, *images, "--model", runs[kind]) == want and all(want)
    code, out, _ = run(capsys, "caption", images[0], "--model", runs[kind])
    assert code == 0 and out == f"{images[0]}\t{want[0]}\n"


def test_caption_options_reach_the_native_captioner(capsys, runs, models, images):
    model, run_dir = models["caption"], runs["caption"]
    cases = [
        (["--beams", "3", "--max-new-tokens", "5"], {"num_beams": 3, "max_new_tokens": 5}),
        (["--sample", "--temperature", "1.5", "--top-p", "0.9", "--seed", "4"],
         {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": 4}),
        (["--repetition-penalty", "1.5", "--batch-size", "2"], {"repetition_penalty": 1.5}),
    ]  # fmt: skip
    for flags, options in cases:
        assert captions(capsys, *images, "--model", run_dir, *flags) == model.caption(images, **options)
    assert captions(capsys, images[0], "--model", run_dir, "--max-new-tokens", "1") != model.caption(images[:1])


def test_caption_refuses_a_prompt_and_a_model_that_does_not_caption(capsys, runs, images, tmp_path):
    code, _, err = run(capsys, "caption", images[0], "--model", runs["caption"], "--prompt", "a photo of")
    assert code == 2 and "does not take a prompt" in err and "BLIP" in err
    clip = tiny_clip(tmp_path / "clip")
    for model in (runs["vqa"], clip):
        code, _, err = run(capsys, "caption", images[0], "--model", model)
        assert code == 2 and "mmfusion train caption" in err and "hf:Salesforce/blip" in err, err


def test_ask_streams_the_generative_runs_own_answer(capsys, runs, models, images):
    model, run_dir = models["genvqa"], runs["genvqa"]
    want = model.answer([images[0]], QUESTION)[0]
    code, out, _ = run(capsys, "ask", images[0], QUESTION, "--model", run_dir)
    assert code == 0 and out == want + "\n" and want
    code, out, _ = run(capsys, "ask", images[0], QUESTION, "--model", run_dir, "--no-stream")
    assert code == 0 and out == want + "\n"
    code, out, _ = run(capsys, "ask", images[0], QUESTION, "--model", run_dir, "--max-new-tokens", "3",
                       "--temperature", "1.2", "--seed", "5", "--json")  # fmt: skip
    record = json.loads(out)
    assert record["answer"] == model.answer([images[0]], QUESTION, max_new_tokens=3, do_sample=True,
                                            temperature=1.2, seed=5)[0]  # fmt: skip
    assert record["model"] == "caption-tiny" and record["options"]["seed"] == 5


def test_ask_a_classifier_gives_one_of_its_answers_and_refuses_generation_flags(capsys, runs, models, images):
    model, run_dir = models["vqa"], runs["vqa"]
    for image in images:
        code, out, _ = run(capsys, "ask", image, QUESTION, "--model", run_dir)
        assert code == 0 and out.strip() == model.answer([image], QUESTION)[0] and out.strip() in ANSWERS
    code, _, err = run(capsys, "ask", images[0], QUESTION, "--model", run_dir, "--temperature", "0.7", "--seed", "1")
    assert code == 2 and "VQA classifier" in err and "--temperature" in err and "--seed" in err


@pytest.mark.parametrize("kind", ["genvqa", "vqa"])
def test_ask_refuses_a_system_prompt_for_an_own_run(capsys, runs, images, kind):
    code, _, err = run(capsys, "ask", images[0], QUESTION, "--model", runs[kind], "--system", "Be brief.")
    assert code == 2 and "no system prompt" in err


def test_ask_refuses_a_model_that_does_not_answer_naming_both_kinds(capsys, runs, images, tmp_path):
    clip = tiny_clip(tmp_path / "clip")
    for model in (runs["caption"], clip):  # a captioner trained on captions only, an embedder
        code, _, err = run(capsys, "ask", images[0], QUESTION, "--model", model)
        assert code == 2 and "mmfusion train vqa" in err and "hf:Qwen" in err, err


@pytest.mark.parametrize(
    "command, words",
    [
        ("caption", ["mmfusion train caption", "runs/caption", "hf:Salesforce/blip-image-captioning-base"]),
        ("ask", ["mmfusion train vqa", "runs/vqa", "hf:Qwen/Qwen2.5-VL-3B-Instruct"]),
        ("serve", ["--captioner runs/demo/caption", "runs/demo/vqa", "mmfusion train caption", "hf:"]),
        ("worker", ["--captioner runs/demo/caption --answerer runs/demo/vqa", "hf:"]),
    ],
)
def test_help_shows_own_runs_beside_hf_models(capsys, command, words):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for w in words:
        assert w in text, w
