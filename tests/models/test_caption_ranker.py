"""A captioner as a re-ranker: its score is the caption's log-likelihood, the same number its training loss reads;
any captioner run re-ranks searches and takes the composition benchmark; ``train rerank --preset caption-tiny``
fine-tunes one to rank, and it stays a captioner."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion.data.tokenizer import PAD_ID
from mmfusion.models.caption_ranker import CaptionRanker, as_reranker
from mmfusion.train import RunConfig, TrainConfig
from tests.tiny_generators import CAPTION_TINY, tiny_generators
from tests.utils import (
    one_thread,  # noqa: E402, F401  (autouse: one torch thread)
    tiny_clip,
)

CAPTIONS = ["a red circle", "a blue square left of a green star", "two shapes: a small red circle and a cross"]


@pytest.fixture(scope="module")
def captioner_run(tmp_path_factory):
    return tiny_generators(tmp_path_factory.mktemp("gen"))["caption"]


def test_the_score_is_the_log_likelihood_the_training_loss_reads(captioner_run):
    model = mmfusion.load(captioner_run).eval()
    images = torch.randn(3, 3, 16, 16)
    tokens = model.tokenizer.encode(CAPTIONS)
    with torch.no_grad():
        loss, _ = model.loss(images, tokens)  # mean cross-entropy over every real token after <sot>
        memory = model.image_tokens(images)
        logp = model.sequence_logprob(memory, tokens)
    words = int((tokens != PAD_ID).sum()) - len(tokens)
    assert logp.shape == (3,) and (logp < 0).all()
    assert float(-logp.sum() / words) == pytest.approx(float(loss), rel=1e-5)
    # against a reference with no mask to get wrong: each next token read from its prefix alone
    with torch.no_grad():
        for p in range(3):
            n = int((tokens[p] != PAD_ID).sum())
            ref = sum(
                torch.log_softmax(model.decoder(tokens[p : p + 1, :t], memory=memory[p : p + 1])[0, -1], -1)[
                    tokens[p, t]
                ]
                for t in range(1, n)
            )
            assert float(logp[p]) == pytest.approx(float(ref), abs=1e-4)
    # one image read by several captions: its keys and values computed once, the same numbers
    with torch.no_grad():
        shared = model.sequence_logprob(memory[:1], tokens, torch.zeros(3, dtype=torch.long))
        apart = model.sequence_logprob(memory[[0, 0, 0]], tokens)
    assert torch.allclose(shared, apart, atol=1e-5)


def test_the_ranker_scores_pairs_and_memories_as_the_captioner(captioner_run):
    model = mmfusion.load(captioner_run).eval()
    ranker = as_reranker(model)
    assert isinstance(ranker, CaptionRanker) and ranker.name == model.name
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)) for i in range(4)]
    got = ranker.score("a red circle", images)
    with torch.no_grad():
        tokens = model.tokenizer.encode(["a red circle"] * 4)
        memory = model.image_tokens(model.transform(images))
        want = model.sequence_logprob(memory, tokens, end=False)
        whole = model.sequence_logprob(memory, tokens)
    assert torch.allclose(got, want, atol=1e-5)
    # the words alone: not whether the caption would stop there (the end token's log-probability left out)
    assert (whole < got).all() and not ranker.end and ranker.first_stage_weight > 0
    assert torch.allclose(CaptionRanker(model, end=True).score("a red circle", images), whole, atol=1e-5)
    memory, feats = ranker.encode_images(images), ranker.encode_texts(CAPTIONS)
    pairs = torch.tensor([[0, 0], [3, 1], [2, 2], [1, 1]])
    assert torch.allclose(ranker.score_memory(memory, feats, pairs, chunk=2),
                          ranker.score_pairs(memory, feats, pairs[:, 0], pairs[:, 1]), atol=1e-5)  # fmt: skip


def test_what_cannot_rerank_is_refused_naming_what_can(tmp_path):
    clip = mmfusion.load(tiny_clip(tmp_path / "clip"))
    with pytest.raises(ValueError, match="not a re-ranker: give a captioner run"):
        as_reranker(clip, "--rerank runs/clip")


def test_a_captioner_run_reranks_searches_and_takes_the_composition_benchmark(captioner_run, tmp_path, capsys):
    from mmfusion.cli.main import main
    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.index import Index

    clip = tiny_clip(tmp_path / "clip")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        ShapesWorld().sample("test", i).image.save(photos / f"scene{i}.png")
    with Index.open(tmp_path / "db", model=clip, write=True) as ix:
        ix.update([photos], progress=False)
    assert main(["search", "a red circle", "--db", str(tmp_path / "db"), "--rerank", str(captioner_run), "-k", "4",
                 "--rerank-k", "6", "--json"]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    ranker = as_reranker(mmfusion.load(captioner_run).eval())
    want = ranker.score("a red circle", [Image.open(r["path"]).convert("RGB") for r in results]).numpy()
    want += ranker.first_stage_weight * np.array([r["similarity"] for r in results])  # mixed with the first stage
    assert [r["score"] for r in results] == pytest.approx(want.tolist(), abs=1e-3)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)

    assert main(["--quiet", "eval", "composition", "--model", str(captioner_run), "--n", "3",
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "(re-ranker)" in printed and "swap_colour" in printed and "CLIP alone" not in printed
    report = json.loads((tmp_path / "c" / "composition_rerank.json").read_text())
    assert set(report) == {"reranker"} and report["reranker"]["types"]["replace_colour"]["i2t"]["n"] == 3

    assert main(["--quiet", "eval", "retrieval", "--model", str(clip), "--rerank", str(captioner_run), "--rerank-k",
                 "5", "--n", "12", "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    assert "re-ranking the top 5 with" in capsys.readouterr().out
    rerank = json.loads((tmp_path / "r" / "retrieval.json").read_text())["rerank"]
    assert 0 <= rerank["semantic_P@1"]["after"] <= 1 and rerank["n_texts"] == 60


def test_the_first_stage_share_can_be_swept_on_the_validation_split(captioner_run, tmp_path):
    """A share so large that the cosine decides gives the first stage's own P@1; the re-ranker's own share gives
    its figure; none gives the likelihood alone."""
    from mmfusion.eval.rerank import rerank_retrieval

    clip = mmfusion.load(tiny_clip(tmp_path / "clip")).eval()
    ranker = as_reranker(mmfusion.load(captioner_run).eval())
    r = rerank_retrieval(ranker, clip, n=12, split="val", k=5, weights=[0, ranker.first_stage_weight, 1e9])
    by = r["semantic_P@1_by_weight"]
    assert by[str(1e9)] == r["semantic_P@1"]["before"]
    assert by[str(ranker.first_stage_weight)] == r["semantic_P@1"]["after"]
    ranker.first_stage_weight = 0.0
    assert rerank_retrieval(ranker, clip, n=12, split="val", k=5)["semantic_P@1"]["after"] == by["0"]
    assert "semantic_P@1_by_weight" not in rerank_retrieval(ranker, clip, n=12, split="val", k=5)


def rerank_config(captioner_run, batch_size: int = 6) -> RunConfig:
    cfg = RunConfig(task="rerank", preset="caption-tiny", model=CAPTION_TINY,
                    train=TrainConfig(batch_size=batch_size, threads=1))  # fmt: skip
    cfg.init.from_captioner = str(captioner_run)
    cfg.data.shapes.image_size = 16
    return cfg


def test_ranking_training_learns_a_batch_and_skips_random_captions(captioner_run):
    from mmfusion.train.rerank_task import CaptionRerankTask

    cfg = rerank_config(captioner_run)
    task = CaptionRerankTask.build(cfg, torch.device("cpu"))
    assert task.random_captions == 0  # a short caption's likelihood is not a meaning's
    assert cfg.rerank.random_captions == 2  # the caller's config is left as it was
    batch = task.prepare(0)
    assert batch.i2t.shape[1] > 1 and batch.t2i.shape[1] > 1  # hard negatives and changed scenes joined
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    task.model.train()
    first = None
    for _ in range(40):  # one batch learned by heart: gradients reach the captioner through its likelihoods
        out = task.train_step(batch, 1, contextlib.nullcontext)
        opt.step()
        opt.zero_grad()
        first = first or out
    rank = [o["loss"] - o["caption_loss"] for o in (first, out)]  # the ranking terms
    assert rank[1] < 0.3 * rank[0] and out["caption_loss"] < first["caption_loss"]
    assert out["i2t_acc"] > first["i2t_acc"] and out["t2i_acc"] > first["t2i_acc"]


def test_a_captioner_ranks_each_negative_against_the_caption_it_was_made_from(captioner_run):
    """A likelihood compares texts of one length: every i2t pair is a caption true of the image and one edit of it
    false of the image, on that image; every negative of the rows has its pair."""
    from mmfusion.data.shapes import satisfies
    from mmfusion.train.rerank_task import CaptionRerankTask

    task = CaptionRerankTask.build(rerank_config(captioner_run), torch.device("cpu"))
    batch = task.prepare(3)
    pairs = batch.i2t_pairs.tolist()
    assert pairs and {f for _, _, f in pairs} == {c for row in batch.i2t.tolist() for c in row[1:] if c >= 0}
    words = lambda t: batch.meanings[t] and task.model.tokenizer.decode(batch.tokens[t].tolist()).split()  # noqa: E731
    for image, true, false in pairs:
        scene = batch.scenes[image]
        assert satisfies(scene, batch.meanings[true]) and not satisfies(scene, batch.meanings[false])
        a, b = words(true), words(false)  # the same words, swapped or but where the edit was
        swapped = sorted(a) == sorted(b)
        assert swapped or (abs(len(a) - len(b)) <= 1 and sum(x != y for x, y in zip(a, b, strict=False)) <= 3)


def test_a_rerank_run_of_a_captioner_saves_a_captioner(captioner_run, tmp_path, capsys):
    from mmfusion.cli.main import main

    out = tmp_path / "cr"
    args = ["train", "rerank", "--preset", "caption-tiny", "--init.from_captioner", str(captioner_run),
            "--steps", "2", "--out", str(out), "--train.batch_size=4", "--train.threads=1",
            "--train.progress=false", "--rerank.eval_scenes=3", "--data.shapes.image_size=16"]  # fmt: skip
    assert main(args) == 0
    assert "swap_colour" in capsys.readouterr().out
    model = mmfusion.load(out)
    assert model.family == "captioner" and model.meta["trained_on"]["from_captioner"] == str(captioner_run)
    assert len(model.caption(torch.randn(1, 3, 16, 16))) == 1  # still a captioner


def test_a_captioner_rerank_run_may_give_its_decoder_the_image_tokens_positions(captioner_run, caplog, tmp_path):
    from mmfusion.train.rerank_task import CaptionRerankTask

    cfg = rerank_config(captioner_run)
    cfg.model = {"decoder": {"memory_positions": True}}
    task = CaptionRerankTask.build(cfg, torch.device("cpu"))
    assert task.model.cfg.decoder.memory_positions and task.model.decoder.memory_pos is not None
    assert "not applied" not in caplog.text  # the one override a loaded captioner takes
    original = mmfusion.load(captioner_run).eval()
    images, tokens = torch.randn(2, 3, 16, 16), original.tokenizer.encode(CAPTIONS[:2])
    with torch.no_grad():  # it starts as the captioner it loaded
        assert torch.allclose(task.model.eval()(images, tokens), original(images, tokens), atol=1e-6)
    cfg.model = {"decoder": {"memory_positions": True, "layers": 5}}
    CaptionRerankTask.build(cfg, torch.device("cpu"))
    assert "not applied" in caplog.text

    from mmfusion.models.checkpoint import save_model

    with torch.no_grad():  # a learned map is saved and rebuilt from the checkpoint's config
        task.model.decoder.memory_pos.weight.normal_()
    save_model(task.model, tmp_path / "pos" / "model")
    loaded = mmfusion.load(tmp_path / "pos").eval()
    assert loaded.cfg.decoder.memory_positions
    with torch.no_grad():
        want = task.model(images, tokens)
        assert torch.allclose(loaded(images, tokens), want, atol=1e-6)
        assert not torch.allclose(original(images, tokens), want, atol=1e-3)
    assert loaded.caption(images) == task.model.caption(images)
    caplog.clear()
    cfg.init.from_captioner, cfg.model = str(tmp_path / "pos"), {"decoder": {"memory_positions": False}}
    CaptionRerankTask.build(cfg, torch.device("cpu"))
    assert "not applied" in caplog.text  # a learned map is not taken away


def test_a_captioner_rerank_run_from_a_clip_fits_the_tokenizer_to_the_decoder(tmp_path):
    from mmfusion.train.rerank_task import CaptionRerankTask

    cfg = RunConfig(task="rerank", preset="caption-tiny", model=CAPTION_TINY, train=TrainConfig(batch_size=4))
    cfg.init.from_clip = str(tiny_clip(tmp_path / "clip"))
    cfg.data.shapes.image_size = 16
    task = CaptionRerankTask.build(cfg, torch.device("cpu"))
    assert task.model.tokenizer.context_length == CAPTION_TINY["decoder"]["context_length"]
    long = " ".join(["a red circle left of a blue square"] * 8)  # longer than the decoder's context
    assert task.model.tokenizer.encode([long]).shape[1] == CAPTION_TINY["decoder"]["context_length"]


def test_a_captioner_rerank_run_needs_a_start():
    from mmfusion.train.rerank_task import CaptionRerankTask

    with pytest.raises(ValueError, match="init.from_captioner"):
        CaptionRerankTask.build(RunConfig(task="rerank", preset="caption-tiny"), torch.device("cpu"))
