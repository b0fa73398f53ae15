"""Export mmfusion's own models to ONNX and quantise them, with a quality gate: ``mmfusion export onnx`` and
``mmfusion quantize``.

- :mod:`.onnx`: a CLIP's image and text towers to ONNX, checked, with the tokenizer and preprocessing beside
  them; :func:`mmfusion.load` runs the result on ONNX Runtime without torch (:mod:`mmfusion.backends.ort`).
- :mod:`.quantize`: ONNX Runtime int8 (dynamic, or static with calibration images) and fp16.
- :mod:`.verify`: retrieval Recall@K before and after, the report and its plot, and the gate that refuses a
  model that lost more than allowed.
"""

from .onnx import export_onnx, load_source

__all__ = ["export_onnx", "load_source"]
