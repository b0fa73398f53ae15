"""Exported CLIPs shared by the export tests: the clip-tiny geometry and the tests' tiny one, with a tokenizer."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def clip_tiny(tmp_path_factory):
    """(checkpoint dir, export dir) of an untrained clip-tiny (64 px, 4 + 2 layers) with a ShapesWorld tokenizer."""
    import torch

    from mmfusion.export import export_onnx
    from mmfusion.models import create_model, save_model
    from tests.utils import shapes_tokenizer

    root = tmp_path_factory.mktemp("clip-tiny")
    torch.manual_seed(0)
    tok = shapes_tokenizer(context_length=32, vocab_size=1024, scenes=50)
    save_model(create_model("clip-tiny", tok), root / "clip")
    export_onnx(root / "clip", root / "onnx")
    return root / "clip", root / "onnx"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(checkpoint dir, export dir) of the tests' tiny CLIP (16 px, one layer per tower)."""
    from mmfusion.export import export_onnx
    from tests.utils import tiny_clip

    root = tmp_path_factory.mktemp("tiny")
    tiny_clip(root / "clip")
    export_onnx(root / "clip", root / "onnx")
    return root / "clip", root / "onnx"
