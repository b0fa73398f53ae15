"""Distillation: the teacher's terms reach the student's loss, a student the teacher's copy starts at the teacher
(zero affinity loss, equal embeddings), the teacher's caches reuse what they embedded, and bad set-ups are refused
with the fix."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.modules.losses import affinity_mimicking
from mmfusion.train.config import DistillConfig, InitConfig
from mmfusion.train.distill import DistillLoss, Teacher, distill_terms
from mmfusion.train.run import train
from tests.utils import tiny_clip, tiny_run


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_affinity_mimicking_is_zero_only_when_the_distributions_agree():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g)
    assert float(affinity_mimicking(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(affinity_mimicking(a + 3.0, a)) == pytest.approx(0.0, abs=1e-5)  # a shift changes no softmax
    assert float(affinity_mimicking(torch.randn(4, 6, generator=g), a)) > 0.05
    with pytest.raises(ValueError, match="differ"):
        affinity_mimicking(a, a[:, :5])


def test_a_student_copy_of_its_teacher_starts_at_the_teacher(tmp_path):
    teacher = tiny_clip(tmp_path / "teacher")
    cfg = tiny_run(tmp_path / "student", steps=2, lr=1e-9)
    cfg = replace(
        cfg, init=InitConfig(from_clip=str(teacher)), distill=DistillConfig(teacher=str(teacher), embed_weight=1.0)
    )
    train(cfg)
    first = metrics(tmp_path / "student")[0]
    assert first["affinity"] == pytest.approx(0.0, abs=1e-5) and first["embed"] == pytest.approx(0.0, abs=1e-5)
    student, original = mmfusion.load(tmp_path / "student"), mmfusion.load(teacher)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(x), original.encode_image(x), atol=1e-4, rtol=1e-4)
    assert student.meta["distilled_from"] == str(teacher) and student.meta["init_from"] == str(teacher)
    assert not list((tmp_path / "student" / "checkpoints").glob("*/train_modules.safetensors"))  # equal widths


def test_a_different_student_learns_from_the_teacher(tmp_path):
    teacher = tiny_clip(tmp_path / "teacher", seed=3)
    cfg = replace(tiny_run(tmp_path / "student", steps=3), distill=DistillConfig(teacher=str(teacher)))
    train(cfg)
    rows = metrics(tmp_path / "student")
    assert all(r["affinity"] > 0 for r in rows) and "embed" not in rows[0]


def test_the_teacher_caches_texts_and_finite_images(tmp_path):
    teacher = Teacher(DistillConfig(teacher=str(tiny_clip(tmp_path / "t"))), torch.device("cpu"), cache_images=True)
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    a = teacher.embed_images(images, [5, 6, 7])
    b = teacher.embed_images(images[[2, 0]], [7, 5])
    torch.testing.assert_close(b, a[[2, 0]])
    assert teacher.hits == 2 and teacher.misses == 3
    t1 = teacher.embed_texts(["a red circle", "a blue star", "a red circle"])
    torch.testing.assert_close(t1[0], t1[2])
    assert teacher.misses == 5 and torch.allclose(t1.norm(dim=-1), torch.ones(3))


def test_embedding_regression_across_widths_goes_through_a_projection():
    cfg = DistillConfig(teacher="x", embed_weight=1.0)
    g = torch.Generator().manual_seed(0)
    z16, z24 = (torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1) for d in (16, 24))
    with pytest.raises(ValueError, match="DistillLoss"):
        distill_terms(cfg, z16, z16, torch.tensor(10.0), z24, z24)
    assert set(distill_terms(replace(cfg, embed_weight=0.0), z16, z16, torch.tensor(10.0), z24, z24)) == {"affinity"}
    assert (
        DistillLoss(cfg, 16, 16).project is None and DistillLoss(replace(cfg, embed_weight=0.0), 16, 24).project is None
    )
    loss = DistillLoss(cfg, 16, 24)
    torch.testing.assert_close(loss.project.maps["image"].weight, torch.eye(24, 16))  # the leading coordinates
    padded = torch.nn.functional.pad(z16, (0, 8))  # the student's embeddings, as 24-d
    with torch.no_grad():
        assert float(loss(z16, z16, torch.tensor(10.0), padded, padded)["embed"]) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(z16, z16, torch.tensor(10.0), z24, z24)["embed"]) > 0.1


def wide_teacher(path, embed_dim: int = 24):
    """A tiny random CLIP of another embedding width than the tiny student's 16."""
    from mmfusion.models import create_model, save_model
    from tests.utils import TINY_MODEL, shapes_tokenizer

    torch.manual_seed(5)
    save_model(create_model("clip-tiny", shapes_tokenizer(scenes=50), **{**TINY_MODEL, "embed_dim": embed_dim}), path)
    return path


def projection(ckpt) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "train_modules.safetensors"))


def test_a_narrower_student_regresses_the_teacher_through_a_learned_projection(tmp_path):
    teacher = wide_teacher(tmp_path / "teacher")
    out = tmp_path / "student"
    train(replace(tiny_run(out, steps=3, save_every=2), distill=DistillConfig(teacher=str(teacher), embed_weight=1.0)))
    assert all(r["embed"] > 0 for r in metrics(out))
    ckpt = out / "checkpoints" / "step-000003"
    weights = projection(ckpt)
    assert set(weights) == {"distill.project.maps.image.weight", "distill.project.maps.text.weight"}
    for w in weights.values():
        assert w.shape == (24, 16) and not torch.allclose(w, torch.eye(24, 16))  # trained from its identity start
    student = mmfusion.load(out)  # an ordinary 16-d CLIP: no projection in its config or weights
    assert student.embed_dim == 16 and student.encode_text(["a red circle"]).shape == (1, 16)
    assert not any("distill" in k or "project" in k for k in student.state_dict())
    saved = (out / "model" / "config.json").read_text() + (ckpt / "config.json").read_text()
    assert "project" not in saved
    assert mmfusion.load(ckpt).embed_dim == 16


def test_a_resumed_run_restores_the_projection(tmp_path):
    """Stopped at step 2 and resumed, a run ends where the uninterrupted run ends: the projection and its optimiser
    state come back from the checkpoint (a fresh identity projection would end elsewhere)."""
    import shutil

    teacher = wide_teacher(tmp_path / "teacher")
    distill = DistillConfig(teacher=str(teacher), embed_weight=1.0)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(replace(tiny_run(whole, steps=4, save_every=2), distill=distill))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    train(replace(tiny_run(resumed, steps=4, save_every=2), distill=distill), resume=True)
    a, b = projection(whole / "checkpoints" / "step-000004"), projection(resumed / "checkpoints" / "step-000004")
    assert not torch.allclose(a["distill.project.maps.image.weight"], torch.eye(24, 16))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="same distill.embed_weight"):  # resumed without the projection
        train(replace(tiny_run(resumed, steps=5), distill=replace(distill, embed_weight=0.0)), resume=True)


def test_a_teacher_refuses_gradient_accumulation(tmp_path):
    teacher = tiny_clip(tmp_path / "teacher")
    cfg = replace(tiny_run(tmp_path / "s", steps=2, accum_steps=2), distill=DistillConfig(teacher=str(teacher)))
    with pytest.raises(ValueError, match="accum_steps=1"):
        train(cfg)


def test_a_teacher_refuses_several_processes(tmp_path, monkeypatch):
    from mmfusion.train.clip_task import ClipTask

    teacher = tiny_clip(tmp_path / "teacher")
    cfg = replace(tiny_run(tmp_path / "s", steps=2), distill=DistillConfig(teacher=str(teacher)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="drop --nproc"):
        ClipTask.build(cfg, torch.device("cpu"))
