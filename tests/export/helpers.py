"""Helpers of the export tests: a script that runs an export with ``import torch`` blocked, and cosines."""

from __future__ import annotations

import numpy as np


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# the start of a script in which `import torch` fails, as where torch is not installed
NO_TORCH = """
import json, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test (import of {name})")
        return None

sys.meta_path.insert(0, NoTorch())
"""

# argv: export dir, image paths (JSON), texts (JSON), where to save the image and text embeddings (.npy)
BLOCKED = (
    NO_TORCH
    + """
import numpy as np
from PIL import Image
import mmfusion

model = mmfusion.load(sys.argv[1])
images = [Image.open(p) for p in json.loads(sys.argv[2])]
texts = json.loads(sys.argv[3])
np.save(sys.argv[4], model.encode_image(images))
np.save(sys.argv[5], model.encode_text(texts))
assert model.transform is None and model.input_size > 0
assert "torch" not in sys.modules, "torch was imported"
print("ok", type(model).__name__)
"""
)
