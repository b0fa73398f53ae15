"""Tiny random-weight runs of mmfusion's own generators, saved as checkpoints ``mmfusion.load`` reads back: a
captioner (``mmfusion train caption``), a captioner that answers by generation (``mmfusion train vqa --preset
caption-tiny``) and a VQA classifier (``mmfusion train vqa``). Random weights say arbitrary words, so tests compare
a surface's output with the loaded model's own calls."""

from __future__ import annotations

from pathlib import Path

from tests.utils import shapes_tokenizer

VISION = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
CAPTION_TINY = {
    "vision": VISION,
    "vision_embed_dim": 16,
    "decoder": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 1, "heads": 2},
    "max_new_tokens": 12,
}
VQA_TINY = {
    "vision": VISION,
    "vision_embed_dim": 16,
    "question": {"vocab_size": 512, "context_length": 24, "width": 32, "layers": 1, "heads": 2},
    "fusion_layers": 1,
}
ANSWERS = ["red", "blue", "green", "yellow", "circle", "square", "yes", "no", "1", "2", "3"]


def tiny_generators(root: Path, seed: int = 0) -> dict[str, Path]:
    """{"caption": a captioner run, "genvqa": a generative VQA run, "vqa": a classifier run} under ``root``,
    each named as training names it (its preset)."""
    import torch

    from mmfusion.models import create_model, save_model

    tok = shapes_tokenizer(scenes=50)
    runs = {"caption": root / "caption", "genvqa": root / "genvqa", "vqa": root / "vqa"}
    torch.manual_seed(seed)
    save_model(create_model("caption-tiny", tok, **CAPTION_TINY), runs["caption"])
    torch.manual_seed(seed + 1)
    save_model(create_model("caption-tiny", tok, **CAPTION_TINY, answers_questions=True), runs["genvqa"])
    torch.manual_seed(seed + 2)
    save_model(create_model("vqa-tiny", tok, **VQA_TINY, answers=ANSWERS), runs["vqa"])
    return runs
