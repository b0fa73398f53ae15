"""The cross-attention re-ranker: shapes, an untrained one ranks as its CLIP, save/load, training lowers its loss,
and its composition scorer plugs into the benchmark."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.models import load, save_model
from mmfusion.models.reranker import Reranker, RerankerConfig
from mmfusion.train import RunConfig, TrainConfig
from tests.utils import (
    TINY_MODEL,
    one_thread,  # noqa: E402, F401  (autouse: one torch thread)
    tiny_clip,
)

HEAD = {"width": 16, "layers": 1, "heads": 2, "align_dim": 8}


def tiny_reranker(tmp_path, seed: int = 0, **cfg) -> Reranker:
    clip = load(tiny_clip(tmp_path / f"clip{seed}", seed=seed))
    torch.manual_seed(seed)
    return Reranker.from_clip(clip, RerankerConfig(**{**HEAD, **cfg}), name="tiny-reranker").eval()


def test_scores_have_one_value_per_pair_and_no_nan(tmp_path):
    model = tiny_reranker(tmp_path)
    images = torch.randn(5, 3, 16, 16)
    tokens = model.clip.tokenize(["a red circle", "a blue square left of a green star", "x", "two shapes", "a"])
    out = model(images, tokens)
    assert out.shape == (5,) and torch.isfinite(out).all()
    assert model.score("a red circle", images).shape == (5,)
    memory, feats = model.encode_images(images), model.encode_texts(tokens)
    assert memory.tokens.shape == (5, 1 + 4, 16) and feats.tokens.shape[0] == 5


def test_an_untrained_reranker_without_alignment_scores_as_its_clip(tmp_path):
    model = tiny_reranker(tmp_path, align=0.0)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        clip = model.clip.logit() * (model.clip.encode_image(images) @ model.clip.encode_text(["a red circle"]).T)
    assert torch.allclose(model.score("a red circle", images), clip.squeeze(1), atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_reranker(tmp_path)
    with torch.no_grad():
        model.head.weight.normal_()  # so the head matters
    save_model(model, tmp_path / "rr")
    back = mmfusion.load(tmp_path / "rr")
    assert isinstance(back, Reranker) and back.cfg.width == 16 and back.cfg.clip.embed_dim == TINY_MODEL["embed_dim"]
    images = torch.randn(3, 3, 16, 16)
    assert torch.allclose(back.score("a red circle", images), model.score("a red circle", images), atol=1e-5)


def test_the_preset_is_registered():
    assert "rerank-tiny" in mmfusion.list_models("rerank-*")
    assert isinstance(mmfusion.create_model("rerank-tiny", layers=1), Reranker)


def test_training_lowers_the_loss_and_leaves_the_frozen_clip(tmp_path):
    from mmfusion.train.rerank_task import RerankTask

    clip_dir = tiny_clip(tmp_path / "clip")
    cfg = RunConfig(task="rerank", preset="rerank-tiny", model=HEAD, train=TrainConfig(batch_size=8, threads=1))
    cfg.init.from_clip = str(clip_dir)
    task = RerankTask.build(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in task.model.clip.state_dict().items()}
    batch = task.prepare(0)
    assert (batch.i2t[:, 0] == torch.arange(8)).all() and (batch.t2i[:, 0] == torch.arange(8)).all()
    assert len(batch.images) > 8 and len(batch.tokens) > 8  # changed scenes and hard negatives joined
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-2)
    task.model.train()
    losses = []
    for _ in range(30):  # one batch, learned by heart: the plumbing carries gradients to the head
        out = task.train_step(batch, 1, contextlib.nullcontext)
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"])
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(torch.equal(before[k], v) for k, v in task.model.clip.state_dict().items())


def test_a_run_trains_saves_and_reports_composition(tmp_path, capsys):
    from mmfusion.cli.main import main

    clip_dir = tiny_clip(tmp_path / "clip")
    out = tmp_path / "rr"
    args = ["train", "rerank", "--init.from_clip", str(clip_dir), "--steps", "2", "--out", str(out),
            "--train.batch_size=4", "--train.threads=1", "--train.progress=false", "--rerank.eval_scenes=4",
            "--model.width=16", "--model.layers=1", "--model.heads=2"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "CLIP alone -> with the re-ranker" in printed and "swap_colour" in printed
    model = mmfusion.load(out)
    assert isinstance(model, Reranker) and model.meta["from_clip"] == str(clip_dir)


def test_a_rerank_run_needs_a_clip(tmp_path):
    from mmfusion.train.rerank_task import RerankTask

    with pytest.raises(ValueError, match="init.from_clip"):
        RerankTask.build(RunConfig(task="rerank", preset="rerank-tiny"), torch.device("cpu"))


def test_the_composition_scorer_scores_each_pair_as_the_model(tmp_path):
    from mmfusion.eval.composition import shapes_set
    from mmfusion.eval.rerank import RerankerScorer

    model = tiny_reranker(tmp_path)
    with torch.no_grad():
        model.head.weight.normal_()
    data = shapes_set(3)
    data.shapes.image_size = 16
    pairs = np.array([it.true for it in data.items[:4]] + [it.false for it in data.items[:4]])
    got = RerankerScorer(model).score(data, pairs)
    pixels = data.pixels()
    from PIL import Image

    want = [float(model.score(data.texts[t], [Image.fromarray(pixels[i])])[0]) for i, t in pairs.tolist()]
    assert np.allclose(got, want, atol=1e-4)


def test_eval_commands_take_a_reranker(tmp_path, capsys):
    from mmfusion.cli.main import main

    clip_dir = tiny_clip(tmp_path / "clip")
    rr = save_model(Reranker.from_clip(load(clip_dir), RerankerConfig(**HEAD, align=0.0)), tmp_path / "rr")
    assert main(["--quiet", "eval", "composition", "--model", str(clip_dir), "--rerank", str(rr), "--n", "3",
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "CLIP alone -> with the re-ranker" in printed
    reports = json.loads((tmp_path / "c" / "composition_rerank.json").read_text())
    # an untrained re-ranker without alignment is its CLIP: the same accuracy on every test
    assert reports["reranker"]["mean"] == reports["clip"]["mean"]
    assert main(["--quiet", "eval", "retrieval", "--model", str(clip_dir), "--rerank", str(rr), "--rerank-k", "5",
                 "--n", "12", "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "re-ranking the top 5" in printed
    report = json.loads((tmp_path / "r" / "retrieval.json").read_text())
    p = report["rerank"]["semantic_P@1"]
    assert p["before"] == pytest.approx(report["metrics"]["semantic_P@1"], abs=0.02)
    assert p["after"] == p["before"]  # untrained, without alignment: the CLIP's order


def test_every_negative_candidate_is_false_and_every_first_one_true(tmp_path):
    from mmfusion.data.shapes import satisfies
    from mmfusion.train.rerank_task import RerankTask

    cfg = RunConfig(task="rerank", preset="rerank-tiny", model=HEAD, train=TrainConfig(batch_size=12, threads=1))
    cfg.init.from_clip = str(tiny_clip(tmp_path / "clip"))
    task = RerankTask.build(cfg, torch.device("cpu"))
    for step in range(3):
        b = task.prepare(step)
        assert len(b.meanings) == len(b.tokens) and len(b.scenes) == len(b.images)
        for i, row in enumerate(b.i2t.tolist()):
            texts = [t for t in row if t >= 0]
            assert satisfies(b.scenes[i], b.meanings[texts[0]])
            assert not any(satisfies(b.scenes[i], b.meanings[t]) for t in texts[1:])
            assert len(set(texts)) == len(texts)
        for i, row in enumerate(b.t2i.tolist()):
            images = [j for j in row if j >= 0]
            assert satisfies(b.scenes[images[0]], b.meanings[i])
            assert not any(satisfies(b.scenes[j], b.meanings[i]) for j in images[1:])
        kinds_made = b.i2t.shape[1] - 1 - cfg.rerank.random_captions
        assert kinds_made >= 1  # hard negatives joined


def test_a_caption_folder_trains_with_word_swap_negatives(tmp_path):
    from mmfusion.train.rerank_task import RerankTask
    from tests.utils import photo

    words = ["red circle", "blue square", "green star", "yellow cross"]
    lines = []
    for i in range(8):
        photo(tmp_path / "folder" / f"{i}.png", (16, 16), seed=i)
        a, b = words[i % 4], words[(i + 1) % 4]
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {a} left of a {b}"}) + "\n")
    (tmp_path / "folder" / "captions.jsonl").write_text("".join(lines))
    cfg = RunConfig(task="rerank", preset="rerank-tiny", model=HEAD, train=TrainConfig(batch_size=4, threads=1))
    cfg.init.from_clip, cfg.data.source = str(tiny_clip(tmp_path / "clip")), str(tmp_path / "folder")
    task = RerankTask.build(cfg, torch.device("cpu"))
    batch = task.prepare(0)
    assert len(batch.tokens) > 4 and len(batch.images) == 4  # word swaps join; no changed scenes without a world
    out = task.train_step(batch, 1, contextlib.nullcontext)
    assert np.isfinite(out["loss"])


def test_a_reranker_learns_from_crowded_scenes_past_the_curriculum(tmp_path):
    from mmfusion.train.rerank_task import RerankTask

    cfg = RunConfig(task="rerank", preset="rerank-tiny", model=HEAD, train=TrainConfig(batch_size=16, threads=1))
    cfg.init.from_clip = str(tiny_clip(tmp_path / "clip"))
    task = RerankTask.build(cfg, torch.device("cpu"))
    assert task.positions(0)[0] == 2 * cfg.data.shapes.curriculum and task.positions(1)[0] == task.positions(0)[0] + 16
    scenes = task.prepare(0).scenes[:16]  # the stream's first 30,000 scenes hold one object each: nothing to swap
    assert sum(len(s.objects) > 1 for s in scenes) >= 6


def test_kinds_restrict_the_negatives_and_unknown_ones_are_refused(tmp_path):
    from mmfusion.train.rerank_task import RerankTask

    cfg = RunConfig(task="rerank", preset="rerank-tiny", model=HEAD, train=TrainConfig(batch_size=16, threads=1))
    cfg.init.from_clip = str(tiny_clip(tmp_path / "clip"))
    cfg.rerank.kinds = ("swap_relation",)
    b = RerankTask.build(cfg, torch.device("cpu")).prepare(0)
    negatives = [t for row in b.i2t.tolist() for t in row[1:] if t >= 16]  # after the batch's own captions
    assert negatives and all(b.meanings[t].get("relations") for t in negatives)  # only relation swaps
    changed = [j for row in b.t2i.tolist() for j in row[1:] if j >= 16]
    assert all(b.meanings[i].get("relations") for i, row in enumerate(b.t2i.tolist()) if any(j >= 16 for j in row))
    assert changed  # objects of a relation swapping places
    cfg.rerank.kinds = ("swap_relation", "swap_colours")
    with pytest.raises(ValueError, match="unknown swap_colours; choose among swap_colour"):
        RerankTask.build(cfg, torch.device("cpu"))


def test_a_type_listed_more_often_is_drawn_more_often(tmp_path):
    """kinds = 3 x replace_colour + replace_shape: about three colour edits to each shape edit, in the hard
    negative captions and in the changed scenes alike."""
    from mmfusion.train.rerank_task import RerankTask

    cfg = RunConfig(task="rerank", preset="rerank-tiny", model=HEAD, train=TrainConfig(batch_size=16, threads=1))
    cfg.init.from_clip = str(tiny_clip(tmp_path / "clip"))
    cfg.rerank.kinds = ("replace_colour", "replace_colour", "replace_colour", "replace_shape")
    task = RerankTask.build(cfg, torch.device("cpu"))
    task.pairwise = True  # each negative beside the caption it edits
    texts, scenes = {"colour": 0, "shape": 0}, {"colour": 0, "shape": 0}
    for step in range(3):
        b = task.prepare(step)
        for _, true, false in b.i2t_pairs.tolist():
            for a, n in zip(b.meanings[true]["objects"], b.meanings[false]["objects"], strict=True):
                texts["colour"] += a.get("colour") != n.get("colour")
                texts["shape"] += a.get("shape") != n.get("shape")
        for i, row in enumerate(b.t2i.tolist()):
            for j in (j for j in row[1:] if j >= 16):
                for a, n in zip(b.scenes[i].objects, b.scenes[j].objects, strict=True):
                    scenes["colour"] += a.colour != n.colour
                    scenes["shape"] += a.shape != n.shape
    for counts in (texts, scenes):
        assert counts["shape"] > 0 and counts["colour"] > 1.8 * counts["shape"], counts
