"""The training loop: schedule, gradient accumulation, checkpoints, exact resume."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.train import train
from mmfusion.train.checkpoint import list_checkpoints
from mmfusion.train.clip_task import ClipTask
from mmfusion.train.config import parse_duration
from mmfusion.train.trainer import Trainer, lr_at
from tests.utils import tiny_run


def test_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10, 0.0) == pytest.approx(0.5)


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("3m") == 180 and parse_duration("2m30s") == 150
    assert parse_duration("1.5h") == 5400
    for bad in ("soon", "3 minutes", "", "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _grads(cfg, accum, loss, k=1, negatives=0):
    torch.manual_seed(0)
    cfg.train.loss = loss
    cfg.train.captions_per_image = k
    cfg.train.hard_negatives = negatives
    task = ClipTask.build(cfg, torch.device("cpu"))
    batch = task.prepare(0)
    task.model.zero_grad()
    metrics = task.train_step(batch, accum, contextlib.nullcontext)
    return metrics, {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("loss", "k", "negatives"),
    [("clip", 1, 0), ("siglip", 1, 0), ("triplet", 1, 0), ("clip", 3, 0), ("siglip", 2, 0), ("clip", 2, 1)],
)
def test_accumulated_step_equals_one_big_batch(tmp_path, loss, k, negatives):
    cfg = tiny_run(tmp_path, batch_size=16)
    big_metrics, big = _grads(cfg, 1, loss, k, negatives)
    acc_metrics, acc = _grads(cfg, 4, loss, k, negatives)
    assert big_metrics["loss"] == pytest.approx(acc_metrics["loss"], rel=1e-5)
    assert big.keys() == acc.keys() and len(big) > 10
    for name in big:
        # float round-off only: micro-batches trim text padding to their own longest caption
        scale = big[name].abs().max().item()
        assert torch.allclose(big[name], acc[name], atol=1e-5 * scale + 1e-7, rtol=1e-4), name


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_the_same_loss_curve(tmp_path, monkeypatch):
    straight = train(tiny_run(tmp_path / "a", steps=8, save_every=3))
    assert straight.steps == 8
    # interrupt the second run during step 6: the checkpoint of step 5 (and 3) remain
    original = ClipTask.train_step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(ClipTask, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train(tiny_run(tmp_path / "b", steps=8, save_every=3))
    monkeypatch.setattr(ClipTask, "train_step", original)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000003", "step-000005"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_run(tmp_path / "b", steps=8, save_every=3))
    resumed = train(tiny_run(tmp_path / "b", steps=8, save_every=3), resume=True)
    assert resumed.steps == 8
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a, b = mmfusion.load(tmp_path / "a"), mmfusion.load(tmp_path / "b")
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na


def test_run_outputs_and_checkpoint_pruning(tmp_path):
    res = train(tiny_run(tmp_path, steps=7, save_every=2, keep_checkpoints=2))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000006", "step-000007"]
    for f in ("run.yaml", "metrics.jsonl", "plots/training.png", "model/model.safetensors", "model/tokenizer.json"):
        assert (tmp_path / f).is_file(), f
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert {"loss", "lr", "temperature", "i2t_acc", "t2i_acc", "grad_norm", "samples_per_s"} <= rows[0].keys()
    assert res.samples == 7 * 8
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["trained_on"]["source"] == "shapes" and "heldout" in meta["trained_on"]["shapes"]
    model = mmfusion.load(tmp_path)
    assert model.logit().item() <= 100.0 + 1e-4


def test_time_budget_fits_the_schedule(tmp_path):
    res = train(tiny_run(tmp_path, steps=None, time="4s", save_every=1000, log_every=5))
    assert res.steps >= 12  # calibration takes 10
    assert res.elapsed_s < 8
    state = json.loads((tmp_path / "checkpoints" / f"step-{res.steps:06d}" / "trainer_state.json").read_text())
    assert state["total_steps"] == res.steps


def test_time_budget_refits_a_pessimistic_first_estimate(tmp_path, monkeypatch, caplog):
    """Calibration steps that were slow (a busy machine, cold caches) must not cut the run short."""
    import time as time_module

    import mmfusion.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "REFIT_AT", (20,))
    monkeypatch.setattr(trainer_module, "REFIT_WINDOW", 5)
    original = ClipTask.train_step
    calls = {"n": 0}

    def slow_at_first(self, *a, **k):
        calls["n"] += 1
        if calls["n"] <= 10:
            time_module.sleep(0.1)
        return original(self, *a, **k)

    monkeypatch.setattr(ClipTask, "train_step", slow_at_first)
    with caplog.at_level("INFO", logger="mmfusion.train.trainer"):
        res = train(tiny_run(tmp_path, steps=None, time="9s", save_every=1000, log_every=5))
    fits = [int(r.getMessage().split("-> ")[1].split()[0]) for r in caplog.records if "per step ->" in r.getMessage()]
    assert len(fits) == 2 and fits[1] > fits[0], fits
    # it ran past the pessimistic first estimate (the re-fit length, or the budget's hard stop if the
    # machine slowed down again after the re-fit), and stayed within the budget
    assert res.steps > fits[0] and res.steps <= fits[1] and res.elapsed_s < 10


def test_training_learns_on_shapesworld(tmp_path):
    res = train(tiny_run(tmp_path, steps=60, batch_size=32, lr=3e-3, save_every=1000, log_every=10))
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] - 0.3, losses
    assert res.last["loss"] < math.log(32)


def test_clip_runs_start_from_whitened_patches(tmp_path):
    cfg = tiny_run(tmp_path)
    cfg.init.whiten_patches = 0
    torch.manual_seed(0)
    plain = ClipTask.build(cfg, torch.device("cpu"))
    cfg.init.whiten_patches = 256
    torch.manual_seed(0)
    white = ClipTask.build(cfg, torch.device("cpu"))
    for (name, a), (_, b) in zip(plain.model.named_parameters(), white.model.named_parameters()):
        assert torch.equal(a, b) == (name != "visual.patch_embed.weight"), name  # only the patch layer moves
    images = torch.cat([white.prepare(s).images for s in range(256 // cfg.train.batch_size)])  # the images used
    with torch.no_grad():
        f = white.model.visual.patch_embed(images).flatten(2).transpose(1, 2).reshape(-1, 32).double()
    cov = torch.cov(f.T)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 1e-3 and cov.diagonal()[:8].min() > 0.9  # decorrelated, leading ones unit variance
    cfg.init.whiten_patches = 1  # 4 patches of 192 pixels cannot be whitened
    with pytest.raises(ValueError, match="raise init.whiten_patches"):
        ClipTask.build(cfg, torch.device("cpu"))


def test_length_must_be_given_once_and_epochs_need_a_finite_dataset(tmp_path):
    cfg = tiny_run(tmp_path, steps=None)
    task = ClipTask.build(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="exactly one"):
        Trainer(cfg, task, tmp_path, torch.device("cpu"))
    cfg.train.epochs = 1.0
    with pytest.raises(ValueError, match="no epochs"):
        Trainer(cfg, task, tmp_path, torch.device("cpu"))


def test_diverging_loss_is_stopped_with_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ClipTask, "train_step", lambda self, *a, **k: {"loss": float("nan"), "i2t_acc": 0.0, "t2i_acc": 0.0}
    )
    with pytest.raises(FloatingPointError, match="lower --train.lr"):
        train(tiny_run(tmp_path))


@pytest.mark.parametrize("size, batch", [(10, 4), (5, 12), (7, 7)])
def test_batch_indices_cover_every_example_once_an_epoch(size, batch):
    from mmfusion.train.trainer import batch_indices

    seen = np.concatenate([batch_indices(3, step, batch, size) for step in range(size * 3)])
    assert all(len(batch_indices(3, s, batch, size)) == batch for s in range(5))
    epochs = seen[: (len(seen) // size) * size].reshape(-1, size)
    assert all(sorted(e) == list(range(size)) for e in epochs)  # a permutation per epoch
    assert not all((e == epochs[0]).all() for e in epochs[1:])  # a fresh one each time
    assert (batch_indices(3, 4, batch, size) == batch_indices(3, 4, batch, size)).all()  # a function of the step
    assert batch_indices(3, 2, 5, 0).tolist() == [10, 11, 12, 13, 14]  # a stream
