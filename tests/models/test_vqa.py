"""The VQA classifier: an Answerer, a checkpoint like any other, learning from ShapesWorld questions."""

import contextlib
import json

import pytest
import torch

import mmfusion
from mmfusion.cli.main import main
from mmfusion.data.shapes import ShapesWorld
from mmfusion.interfaces import Answerer
from mmfusion.models import create_model, save_model
from mmfusion.train import DataConfig, RunConfig, TrainConfig, train
from tests.utils import shapes_tokenizer, tiny_clip

TINY = {
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "vision_embed_dim": 16,
    "question": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 1, "heads": 2},
    "fusion_layers": 1,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vqa-tiny", shapes_tokenizer(), **TINY, answers=["red", "blue", "yes", "no", "2"]).eval()


def test_answers_one_question_per_image_or_one_for_all(model):
    world = ShapesWorld()
    images = [world.sample("test", i).image for i in range(3)]
    one = model.answer(images, "what colour is the circle?")
    assert len(one) == 3 and all(a in model.cfg.answers for a in one)
    assert model.answer(images, ["q1", "q2", "q3"]) == [
        model.answer([im], q)[0] for im, q in zip(images, ["q1", "q2", "q3"])
    ]
    assert len(model.answer(images[0], ["is there a square?", "how many shapes?"])) == 2
    assert "".join(model.stream_answer(images[0], "what colour?")) == model.answer(images[0], "what colour?")[0]
    assert isinstance(model, Answerer)
    probs = model.scores(images, "how many?")
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="2 questions for 3 images"):
        model.answer(images, ["a", "b"])
    with pytest.raises(ValueError, match="unknown generation option"):
        model.answer(images, "q", beams=3)


def test_several_questions_per_image_encode_the_image_once(model):
    world = ShapesWorld()
    pixels = model.transform([world.sample("test", i).image for i in range(2)])
    qs = ["what colour is the circle?", "how many shapes?", "is there a star?"]
    tokens = model.tokenizer.encode(qs)
    index = torch.tensor([0, 0, 1])
    with torch.no_grad():
        shared = model(pixels, tokens, index)
        separate = model(pixels[index], tokens)
    torch.testing.assert_close(shared, separate)
    with pytest.raises(ValueError, match="pass image_index"):
        model(pixels, tokens)


def test_training_batches_ask_k_different_questions_of_each_image():
    from mmfusion.train.vqa_task import VQATask

    cfg = RunConfig(task="vqa", preset="vqa-tiny", model=TINY, train=TrainConfig(batch_size=3, progress=False))
    cfg.vqa.questions_per_image = 4
    task = VQATask.build(cfg, torch.device("cpu"))
    images, tokens, image_index, answers = task.prepare(0)
    assert images.shape[0] == 3 and image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    questions = [task.model.tokenizer.decode(row) for row in tokens]
    assert all(len(set(questions[i * 4 : i * 4 + 4])) == 4 for i in range(3))  # different questions
    assert (answers >= 0).all()
    # micro-batches (accumulation) split by image give the gradient of the whole batch (no dropout)
    task.model.eval()
    grads = []
    for accum in (1, 2):
        task.model.zero_grad()
        task.train_step((images, tokens, image_index, answers), accum, contextlib.nullcontext)
        grads.append(torch.cat([p.grad.flatten() for p in task.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_round_trip_through_a_checkpoint(tmp_path, model):
    save_model(model, tmp_path / "vqa")
    loaded = mmfusion.load(tmp_path / "vqa")
    assert loaded.cfg.answers == model.cfg.answers and loaded.family == "vqa"
    images = [ShapesWorld().sample("test", i).image for i in range(2)]
    torch.testing.assert_close(loaded.scores(images, "what shape?"), model.scores(images, "what shape?"))
    with pytest.raises(ValueError, match="answer vocabulary"):
        create_model("vqa-tiny", **TINY)


def test_training_learns_shapesworld_answers(tmp_path):
    cfg = RunConfig(
        task="vqa", preset="vqa-tiny", model=TINY, data=DataConfig(tokenizer_captions=300),
        train=TrainConfig(steps=80, batch_size=32, lr=3e-3, warmup_steps=4, log_every=1, save_every=40,
                          progress=False, threads=1),
        out=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    model = mmfusion.load(result.out)
    answers = set(model.cfg.answers)
    assert {"yes", "no", "red", "circle", "2", "3"} <= answers  # colours, shapes, counts and yes/no
    assert any(len(a.split()) == 2 for a in answers)  # "red circle": the answers of relation questions


def test_starts_from_a_clip_image_tower(tmp_path):
    clip = mmfusion.load(tiny_clip(tmp_path / "clip"))
    cfg = RunConfig(task="vqa", preset="vqa-tiny", model={"question": TINY["question"], "fusion_layers": 1},
                    data=DataConfig(tokenizer_captions=50), out=str(tmp_path / "run"),
                    train=TrainConfig(steps=2, batch_size=4, progress=False, threads=1, warmup_steps=1))  # fmt: skip
    cfg.init.from_clip, cfg.init.freeze_vision = str(tmp_path / "clip"), True
    model = mmfusion.load(train(cfg).out)
    for k, v in clip.visual.state_dict().items():  # frozen: unchanged by training
        torch.testing.assert_close(model.visual.state_dict()[k], v)


def test_cli_train_vqa_then_ask(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["-q", "train", "vqa", "--steps", "2", "--out", str(out), "--train.batch_size=4",
            "--train.progress=false", "--data.tokenizer_captions=50"]  # fmt: skip
    args += [f"--model.{k}.{kk}={vv}" for k, v in TINY.items() if isinstance(v, dict) for kk, vv in v.items()]
    args += ["--model.vision_embed_dim=16", "--model.fusion_layers=1"]
    assert main(args) == 0
    assert "mmfusion ask --model" in capsys.readouterr().out
    img = tmp_path / "scene.png"
    ShapesWorld().sample("test", 0).image.save(img)
    assert main(["-q", "ask", "--model", str(out), str(img), "what colour is the circle?"]) == 0
    assert capsys.readouterr().out.strip() in mmfusion.load(out).cfg.answers
    assert main(["-q", "eval", "vqa", "--model", str(out), "--n", "10", "--json", str(tmp_path / "v.json")]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["n"] == 10 and 0 <= report["metrics"]["accuracy"] <= 1


# ---- answering by generation, through a captioner's decoder ------------------------------------------------

GEN_TINY = {
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "vision_embed_dim": 16,
    "decoder": {"width": 32, "layers": 1, "heads": 2},
}


def test_generative_vqa_learns_answers_and_still_captions(tmp_path):
    from mmfusion.interfaces import Answerer, Captioner

    cfg = RunConfig(task="vqa", preset="caption-tiny", model=GEN_TINY, data=DataConfig(tokenizer_captions=300),
                    train=TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=4, log_every=1,
                                      progress=False, threads=1), out=str(tmp_path / "run"))  # fmt: skip
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < 0.6 * rows[0]["loss"]
    model = mmfusion.load(result.out)
    assert model.family == "captioner" and model.cfg.answers_questions
    assert isinstance(model, Answerer) and isinstance(model, Captioner)
    world = ShapesWorld()
    images = [world.sample("test", i).image for i in range(4)]
    answers = model.answer(images, "is there a red square?")
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    # questions of different lengths in one call: each answered as if alone
    qs = ["how many objects are there?", "what colour is the star?", "is there a blue circle?", "what shape?"]
    assert model.answer(images, qs) == [model.answer([im], q)[0] for im, q in zip(images, qs, strict=True)]
    assert "".join(model.stream_answer(images[0], qs[0])) == model.answer(images[0], qs[0])[0]
    assert model.answer(images[0], qs) == [model.answer(images[0], q)[0] for q in qs]  # one image, many questions
    assert model.answer(model.transform(images), qs) == model.answer(images, qs)  # preprocessed pixels
    with pytest.raises(ValueError, match="3 questions for 4 images"):
        model.answer(images, qs[:3])
    assert len(model.caption(images[:2])) == 2


def test_the_loss_of_a_question_sequence_is_on_its_answer_only():
    torch.manual_seed(0)
    model = create_model("caption-tiny", shapes_tokenizer(), **GEN_TINY).train(False)
    tok = model.tokenizer
    prompt = model.prompt_ids("what colour is the circle?")
    seq = [*prompt, *tok.ids("red"), 3]
    tokens = torch.zeros(1, 24, dtype=torch.long)
    tokens[0, : len(seq)] = torch.tensor(seq)
    images = torch.randn(1, 3, 16, 16)
    loss, _ = model.loss(images, tokens, torch.tensor([len(prompt)]))
    logits = model(images, tokens[:, : len(seq)])[0]  # (len - 1, vocab): position j predicts token j + 1
    answer_part = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 :], tokens[0, len(prompt) : len(seq)])
    torch.testing.assert_close(loss, answer_part)
    assert not torch.allclose(model.loss(images, tokens)[0], loss)  # without prompt lengths: every token counts


def test_a_caption_only_model_says_how_to_get_answers():
    model = create_model("caption-tiny", shapes_tokenizer(), **GEN_TINY)
    with pytest.raises(RuntimeError, match="train vqa --preset caption-tiny"):
        model.answer(ShapesWorld().sample("test", 0).image, "what colour?")


def test_generative_vqa_fine_tunes_a_trained_captioner(tmp_path):
    cap = RunConfig(task="caption", preset="caption-tiny", model=GEN_TINY, data=DataConfig(tokenizer_captions=300),
                    train=TrainConfig(steps=3, batch_size=8, progress=False, threads=1, warmup_steps=1),
                    out=str(tmp_path / "cap"))  # fmt: skip
    captioner = mmfusion.load(train(cap).out)
    cfg = RunConfig(task="vqa", preset="caption-tiny", out=str(tmp_path / "vqa"),
                    train=TrainConfig(steps=2, batch_size=4, progress=False, threads=1, warmup_steps=1))  # fmt: skip
    cfg.init.from_captioner, cfg.init.freeze_vision = str(tmp_path / "cap"), True
    model = mmfusion.load(train(cfg).out)
    assert model.cfg.answers_questions and model.cfg.decoder == captioner.cfg.decoder  # its geometry, not the preset's
    assert model.tokenizer.vocab_size == captioner.tokenizer.vocab_size
    for k, v in captioner.visual.state_dict().items():  # frozen image encoder: unchanged
        torch.testing.assert_close(model.visual.state_dict()[k], v)
    assert model.meta["trained_on"]["from_captioner"] == str(tmp_path / "cap")
    cfg.init.from_captioner, cfg.out = str(tiny_clip(tmp_path / "clip")), str(tmp_path / "vqa2")
    with pytest.raises(ValueError, match="not a captioner"):
        train(cfg)
