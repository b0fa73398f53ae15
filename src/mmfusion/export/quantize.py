"""int8 (and fp16) versions of an ONNX export, kept only when they prove they kept their quality.

ONNX Runtime's quantisers do the arithmetic (Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", 2018):

- ``dynamic``: weights of the matrix products stored as int8, activations quantised on the fly per call;
  no data needed.
- ``static``: activations too, with ranges measured once on calibration data (images for the image tower,
  captions for the text tower), in ONNX's QDQ form.
- ``fp16``: weights and arithmetic in half precision, inputs and outputs left in float32.

Every tool that quantises says "check the accuracy yourself". This one checks: the new model and its source
are measured on the same retrieval data and labelled images (:mod:`.verify`), and when any Recall@K (or the
zero-shot accuracy) dropped by more than ``max_drop`` nothing is written. The new export is built in a
temporary directory beside ``out`` and renamed into place only when it passed. (Native checkpoints quantised
in torch go through the same gate: :mod:`.quantize_torch`.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.ort import (
    EXPORT_FILE,
    IMAGE_FILE,
    TEXT_FILE,
    TOKENIZER_FILE,
    OrtEmbedder,
    files_digest,
    load_export,
    read_export_config,
)
from ..utils.io import atomic_write_json
from . import verify
from .onnx import publish, staging_dir

log = logging.getLogger(__name__)
MODES = ("dynamic", "static", "fp16")
REPORT_JSON, REPORT_PNG = "quantize_report.json", "quantize_report.png"


@dataclass
class QuantizeOptions:
    """How to quantise, and how to prove the result still works."""

    mode: str = "dynamic"  # dynamic, static or fp16
    per_channel: bool = False  # one int8 scale per output channel of each weight, not one per tensor
    calibration: str | None = None  # static: a folder of images (captions.jsonl beside them calibrates the text)
    calibration_n: int = 128  # static: images (and captions) that calibrate the activation ranges
    verify: str = "shapes"  # shapes (the ShapesWorld the model was trained on) or a folder with captions.jsonl
    n: int = 1000  # images to rank when verifying
    split: str = "test"
    labels: str | None = None  # zero-shot images: 'shapes', class folders, 'none'; default: --verify's own labels
    zeroshot_per_class: int = 20  # labelled images per class in the zero-shot part of the gate (0: none)
    max_drop: float = 0.01  # the most any gated metric may fall
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizeResult:
    report: dict[str, Any]
    out: Path | None  # where the model was written; None when the gate refused it

    @property
    def passed(self) -> bool:
        return self.out is not None


# ---- calibration data --------------------------------------------------------------------------------------------


def calibration_data(source: OrtEmbedder, folder: str | None, n: int) -> tuple[list, list[str], str]:
    """(images, captions, where from) that calibrate the activation ranges: the folder's images (and its
    ``captions.jsonl``, else the training world's captions), or ShapesWorld's train split as the model saw it."""
    from ..data.datasets import read_captions
    from ..data.images import IMAGE_EXTENSIONS, load_image
    from ..data.shapes import ShapesWorld
    from ..eval.report import shapes_config_of

    world = ShapesWorld(shapes_config_of(source))
    shapes_texts = [c.text for i in range(n) for c in world.sample("train", i).captions][:n]
    if folder is None:
        samples = [world.sample("train", i) for i in range(n)]
        return [s.image for s in samples], shapes_texts, f"ShapesWorld train split, {n} scenes"
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--calibration {folder}: no such folder; give a folder of images (a few hundred like those the model "
            "will see), or leave it out to calibrate on ShapesWorld"
        )
    if (root / "captions.jsonl").is_file():
        records = read_captions(root)[:n]
        paths = [root / r.image for r in records]
        texts = [c for r in records for c in r.captions][:n]
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
        texts = shapes_texts
    if not paths:
        raise FileNotFoundError(f"--calibration {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [load_image(p) for p in paths], texts, f"{root} ({len(paths)} images, {len(texts)} captions)"


def _batches(inputs: dict[str, np.ndarray], size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    for s in range(0, n, size):
        yield {name: a[s : s + size] for name, a in inputs.items()}


def _reader(inputs: dict[str, np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feed = _batches(inputs)

        def get_next(self):
            return next(self.feed, None)

    return Reader()


# ---- the quantisers -------------------------------------------------------------------------------------------------


def _prepared(src: Path, tmp: Path) -> Path:
    """The graph with shapes inferred and ops fused, as ONNX Runtime's quantiser prefers its input; the graph
    itself when that step fails (it is an optimisation, not a requirement).

    Symbolic shape inference is skipped: it gives up on the text tower's dynamic length, and when it does it
    leaves its temporary files in the current directory.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / f"_prepared_{src.name}"
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        return out
    except Exception as e:
        log.info("pre-processing %s for quantisation failed (%s); quantising it as exported", src.name, e)
        return src


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantiser logs a line per tensor on the root logger; keep its INFO out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_graph(src: Path, dst: Path, opts: QuantizeOptions, inputs: dict[str, np.ndarray] | None) -> None:
    with _quiet_quantizer():
        _quantize_graph_loud(src, dst, opts, inputs)


def _quantize_graph_loud(src: Path, dst: Path, opts: QuantizeOptions, inputs: dict[str, np.ndarray] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if opts.mode == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
        return
    prepared = _prepared(src, dst.parent)
    if opts.mode == "dynamic":
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=opts.per_channel, weight_type=QuantType.QInt8)  # fmt: skip
    else:
        quantize_static(
            str(prepared), str(dst), _reader(inputs), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=opts.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    if prepared != src:
        prepared.unlink(missing_ok=True)


def _size_mb(directory: Path) -> float:
    return sum((directory / f).stat().st_size for f in (IMAGE_FILE, TEXT_FILE)) / 2**20


def write_quantized(source: OrtEmbedder, tmp: Path, opts: QuantizeOptions) -> dict[str, Any]:
    """The quantised towers, the tokenizer and ``export.json`` into ``tmp``; returns what calibrated it."""
    src = source.path
    calibration: dict[str, Any] = {}
    images = texts = None
    if opts.mode == "static":
        if source.tokenizer is None:
            raise ValueError(f"{src} has no tokenizer, so its text tower cannot be calibrated: export a trained run")
        pil, captions, where = calibration_data(source, opts.calibration, opts.calibration_n)
        images = {source.image_session.get_inputs()[0].name: source.preprocess(pil)}
        if source.tokenize is None:  # a pretrained model: its tokenizer gives every input of the text graph
            texts = source.tokenizer.encode(captions)
        else:
            texts = {source.text_session.get_inputs()[0].name: source.tokenize(captions)}
        calibration = {"data": where, "images": len(pil), "texts": len(captions), "method": "MinMax"}
    _quantize_graph(src / IMAGE_FILE, tmp / IMAGE_FILE, opts, images)
    _quantize_graph(src / TEXT_FILE, tmp / TEXT_FILE, opts, texts)
    if (src / TOKENIZER_FILE).is_file():
        shutil.copy2(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    cfg = dict(source.config)
    cfg["precision"] = "fp16" if opts.mode == "fp16" else f"int8-{opts.mode}"
    cfg["fingerprint"] = files_digest(tmp)  # new weights: an index built with the source does not take it
    cfg["quantized_from"] = {"path": str(src.resolve()), "fingerprint": source.fingerprint}
    cfg["quantization"] = {"mode": opts.mode, "per_channel": opts.per_channel, **calibration}
    atomic_write_json(tmp / EXPORT_FILE, cfg)
    return calibration


def quantize_export(src: str | os.PathLike, out: str | os.PathLike, opts: QuantizeOptions,
                    report_path: str | os.PathLike | None = None) -> QuantizeResult:  # fmt: skip
    """Quantise an fp32 export, measure it against its source, and write it to ``out`` only if it passed.

    Args:
        src: an fp32 export directory (``mmfusion export onnx``).
        out: where the quantised export goes, with ``quantize_report.json`` and ``.png`` (nothing is written
            there when the gate refuses it).
        opts: mode, calibration and the gate.
        report_path: also write the JSON report here, passed or not (for CI logs).

    Raises:
        ExportDirError: ``src`` is not an export directory.
        ValueError: a bad option, or a source that is already quantised.
    """
    t0 = time.perf_counter()
    if opts.mode not in MODES:
        raise ValueError(f"unknown --mode {opts.mode!r}; choose one of {', '.join(MODES)}")
    cfg = read_export_config(src)
    if cfg.get("precision", "fp32") != "fp32":
        origin = (cfg.get("quantized_from") or {}).get("path", "the fp32 export")
        raise ValueError(f"{src} is already {cfg['precision']}; quantise the fp32 export it came from ({origin})")
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError("--out must differ from --model: the fp32 export is the reference the gate measures against")
    source = load_export(src, threads=opts.threads)
    ds, labelled = gate_data(source, opts)
    out = Path(out)
    tmp = staging_dir(out)
    try:
        calibration = write_quantized(source, tmp, opts)
        target = load_export(tmp, threads=opts.threads)
        before, after = verify.measure(source, ds, labelled), verify.measure(target, ds, labelled)
        del target  # the sessions hold the files open
        report = {
            "task": "quantize",
            "runtime": "onnxruntime",
            "source": str(src),
            "out": str(out),
            "mode": opts.mode,
            "per_channel": opts.per_channel,
            "calibration": calibration or None,
            **gate_report(before, after, ds, labelled, opts),
            "size_mb": {"before": round(_size_mb(Path(src)), 2), "after": round(_size_mb(tmp), 2)},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        title = f"{opts.mode} int8" if opts.mode != "fp16" else "fp16"
        return conclude(report, tmp, out, report_path, title)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gate_data(source, opts: QuantizeOptions) -> tuple[verify.RetrievalSet, verify.LabelledSet | None]:
    """The retrieval set and the labelled images (or None) both models are measured on."""
    ds = verify.verification_set(source, opts.verify, opts.n, opts.split)
    labels = verify.labels_for(opts.verify, opts.labels)
    return ds, verify.labelled_set(source, labels, opts.zeroshot_per_class)


def gate_report(before: verify.Measured, after: verify.Measured, ds: verify.RetrievalSet,
                labelled: verify.LabelledSet | None, opts: QuantizeOptions) -> dict[str, Any]:  # fmt: skip
    """The report's ``verify`` (what was measured) and ``gate`` (the verdict) parts."""
    data = {"data": ds.source, "n_images": len(ds.images), "n_texts": sum(map(len, ds.captions))}
    if labelled is not None:
        data["zeroshot"] = {"data": labelled.source, "classes": len(labelled.classes), "n_images": labelled.n}
    return {"verify": data, "gate": verify.compare(before, after, opts.max_drop)}


def conclude(report: dict[str, Any], tmp: Path, out: Path, report_path, title: str) -> QuantizeResult:
    """Refuse (remove the staged model) or keep it (its report and plot beside it, then ``out`` replaced whole);
    the report goes to ``report_path`` either way."""
    if report_path is not None:
        atomic_write_json(report_path, report)
    gate = report["gate"]
    if not gate["passed"]:
        shutil.rmtree(tmp, ignore_errors=True)
        return QuantizeResult(report, None)
    atomic_write_json(tmp / REPORT_JSON, report)
    verify.plot_comparison(gate, tmp / REPORT_PNG, title)
    publish(tmp, out)
    return QuantizeResult(report, out)


def gate_summary(result: QuantizeResult) -> Sequence[str]:
    lines = verify.summary_lines(result.report)
    if result.passed:
        lines.append(f"  kept: {result.out} (report: {result.out / REPORT_JSON}, plot: {result.out / REPORT_PNG})")
    else:
        gate = result.report["gate"]
        lines.append(
            f"refused: {', '.join(gate['failed'])} dropped by more than --max-drop {gate['max_drop']:g}; nothing was "
            f"written to {result.report['out']}. Try --mode static with --calibration on images like yours, "
            "--per-channel, or keep the fp32 export"
        )
    return lines
