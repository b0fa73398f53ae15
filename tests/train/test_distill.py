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
from mmfusion.train.distill import Teacher, distill_terms
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


def test_embedding_regression_needs_equal_widths():
    cfg = DistillConfig(teacher="x", embed_weight=1.0)
    z16, z8 = (
        torch.nn.functional.normalize(torch.randn(2, 16), dim=-1),
        torch.nn.functional.normalize(torch.randn(2, 8), dim=-1),
    )
    with pytest.raises(ValueError, match="embed_weight=0"):
        distill_terms(cfg, z16, z16, torch.tensor(10.0), z8, z8)
    assert set(distill_terms(replace(cfg, embed_weight=0.0), z16, z16, torch.tensor(10.0), z8, z8)) == {"affinity"}


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
