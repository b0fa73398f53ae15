"""Weight inheritance: a student of the teacher's own config becomes the teacher exactly, a smaller one takes the
chosen slices of its weights and runs, the importance ranking picks what pruning would keep, and a student that
cannot inherit is refused with what differs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import mmfusion
from mmfusion.data.pairs import PairSampler, ShapesPairs
from mmfusion.data.shapes import ShapesWorld
from mmfusion.models import create_model
from mmfusion.train.config import DistillConfig
from mmfusion.train.inherit import InheritanceError, evenly_spaced, inherit
from mmfusion.train.prune import batches_of, measure_importance
from mmfusion.train.run import train
from tests.utils import TINY_MODEL, shapes_tokenizer, tiny_clip, tiny_run

TEACHER = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 4, "heads": 4},
    "text": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 2, "heads": 4},
}
STUDENT = {  # 3 of 4 image blocks, 3 of 4 heads (of the same 8 channels), narrower everywhere
    "embed_dim": 12,
    "vision": {"image_size": 16, "patch_size": 8, "width": 24, "layers": 3, "heads": 3, "mlp_ratio": 1.5},
    "text": {"vocab_size": 512, "context_length": 24, "width": 24, "layers": 1, "heads": 3},
}


@pytest.fixture(scope="module")
def tokenizer():
    return shapes_tokenizer(scenes=50)


def model(config: dict, tokenizer, seed: int):
    torch.manual_seed(seed)
    return create_model("clip-tiny", tokenizer, **config).eval()


def batches(teacher, n: int = 2):
    sampler = PairSampler(ShapesPairs(ShapesWorld(), teacher.cfg.vision.image_size), 0)
    return batches_of(teacher, sampler, n, 8)


def outputs(m) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m.encode_image(x), m.encode_text(["a red circle", "two blue squares left of a star"])


def test_layers_are_evenly_spaced_first_and_last_kept():
    assert evenly_spaced(3, 4) == [0, 2, 3] and evenly_spaced(2, 4) == [0, 3] and evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(1, 4) == [0] and evenly_spaced(3, 12) == [0, 6, 11]


@pytest.mark.parametrize("by_importance", [False, True])
def test_a_student_of_the_teachers_config_becomes_the_teacher(tokenizer, by_importance):
    teacher, student = model(TEACHER, tokenizer, 0), model(TEACHER, tokenizer, 1)
    assert not torch.equal(outputs(student)[0], outputs(teacher)[0])
    summary = inherit(student, teacher, batches(teacher) if by_importance else None)
    for a, b in zip(outputs(student), outputs(teacher), strict=True):
        assert torch.equal(a, b)
    assert summary["image"]["blocks"] == [0, 1, 2, 3] and summary["by"] == (
        "importance" if by_importance else "leading"
    )


def test_a_smaller_student_takes_the_leading_slices(tokenizer):
    teacher, student = model(TEACHER, tokenizer, 0), model(STUDENT, tokenizer, 1)
    summary = inherit(student, teacher)
    assert summary["image"]["blocks"] == [0, 2, 3] and summary["text"]["blocks"] == [0]
    s, t = student.visual.transformer.blocks[1], teacher.visual.transformer.blocks[2]
    assert s.mlp.fc1.weight.shape == (36, 24)
    torch.testing.assert_close(s.mlp.fc1.weight, t.mlp.fc1.weight[:36, :24], rtol=0, atol=0)
    # q of the student's heads 0-2 are the teacher's heads 0-2 (8 channels each), then k from the teacher's k
    torch.testing.assert_close(s.attn.qkv.weight[:24], t.attn.qkv.weight[:24, :24], rtol=0, atol=0)
    torch.testing.assert_close(s.attn.qkv.weight[24:48], t.attn.qkv.weight[32:56, :24], rtol=0, atol=0)
    torch.testing.assert_close(student.text.proj, teacher.text.proj[:24, :12], rtol=0, atol=0)
    torch.testing.assert_close(student.text.token_embed.weight, teacher.text.token_embed.weight[:, :24], rtol=0, atol=0)
    image, text = outputs(student)
    assert image.shape == (3, 12) and text.shape == (2, 12) and torch.isfinite(image).all()


def test_importance_keeps_what_pruning_ranks_highest(tokenizer):
    teacher, student = model(TEACHER, tokenizer, 0), model(STUDENT, tokenizer, 1)
    summary = inherit(student, teacher, batches(teacher))
    scores = measure_importance(teacher, batches(teacher))
    best = np.sort(np.argsort(-scores.heads["image"][2], kind="stable")[:3])
    assert summary["image"]["heads"][1] == best.tolist()
    h, hd = best[0], 8
    t = teacher.visual.transformer.blocks[2]
    got = student.visual.transformer.blocks[1].attn.out.weight[:, :hd]
    torch.testing.assert_close(got, t.attn.out.weight[:24, h * hd : (h + 1) * hd], rtol=0, atol=0)
    channels = np.sort(np.argsort(-scores.mlp["image"][2], kind="stable")[:36])
    want = t.mlp.fc2.weight[:24][:, torch.as_tensor(channels)]
    torch.testing.assert_close(student.visual.transformer.blocks[1].mlp.fc2.weight, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"vision": {**STUDENT["vision"], "patch_size": 4}}, "vision.patch_size 4 (the teacher's is 8)"),
        ({"vision": {**STUDENT["vision"], "layers": 5}}, "vision.layers 5 (more than the teacher's 4)"),
        ({"text": {**STUDENT["text"], "vocab_size": 600}}, "text.vocab_size 600"),
        ({"embed_dim": 20}, "embed_dim 20 (more than the teacher's 16)"),
    ],
)
def test_an_incompatible_student_is_refused_with_what_differs(tokenizer, change, named):
    teacher, student = model(TEACHER, tokenizer, 0), model({**STUDENT, **change}, tokenizer, 1)
    with pytest.raises(InheritanceError, match="distill.inherit=false") as e:
        inherit(student, teacher)
    assert named in str(e.value)


def test_a_teacher_that_is_no_native_clip_is_refused(tokenizer):
    class Pretrained:
        family = "hf-clip"

    with pytest.raises(InheritanceError, match="native CLIP teacher"):
        inherit(model(STUDENT, tokenizer, 1), Pretrained())


def test_distillation_with_inheritance_starts_at_the_teacher(tmp_path):
    """The issue's check: the student = teacher architecture, inherited, starts at the teacher (no affinity or
    embedding loss at the first step) and records what it inherited."""
    teacher = tiny_clip(tmp_path / "teacher")
    cfg = tiny_run(tmp_path / "student", steps=1, lr=1e-9)
    train(replace(cfg, distill=DistillConfig(teacher=str(teacher), embed_weight=1.0, inherit=True)))
    first = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["affinity"] == pytest.approx(0.0, abs=1e-5) and first["embed"] == pytest.approx(0.0, abs=1e-5)
    student = mmfusion.load(tmp_path / "student")
    assert student.meta["inherited_from"]["teacher"] == str(teacher)
    assert (
        student.tokenizer.encode(["a red circle"]).tolist()
        == mmfusion.load(teacher).tokenizer.encode(["a red circle"]).tolist()
    )
    assert TINY_MODEL["embed_dim"] == student.embed_dim


def test_inheritance_and_another_starting_model_are_refused(tmp_path):
    from mmfusion.train.config import InitConfig

    teacher = tiny_clip(tmp_path / "teacher")
    cfg = replace(tiny_run(tmp_path / "s", steps=1), init=InitConfig(from_clip=str(teacher)))
    with pytest.raises(ValueError, match="drop one of them"):
        train(replace(cfg, distill=DistillConfig(teacher=str(teacher), inherit=True)))
    with pytest.raises(ValueError, match="name one with distill.teacher"):
        train(replace(tiny_run(tmp_path / "t", steps=1), distill=DistillConfig(inherit=True)))
