"""int8 of a native checkpoint in torch (dynamic: int8 linear weights, activations quantised per call), through
the same quality gate as the ONNX path: kept only when it proves it kept its quality.

The kept model is the fp32 checkpoint copied with ``"quantize": "int8"`` in its ``config.json``: the weights stay
in safetensors (torch's packed int8 weights have no safetensors form) and every load quantises them the same way,
deterministically, so what runs is what the gate measured. On disk it is the size of the fp32 model; in memory
its linear layers take a quarter.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..models.checkpoint import CONFIG_FILE, resolve_checkpoint, weights_fingerprint
from ..models.int8 import INT8, native_int8
from ..utils.io import atomic_write_json
from . import verify
from .onnx import staging_dir
from .quantize import QuantizeOptions, QuantizeResult, conclude, gate_data, gate_report


def _size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) / 1e6


def quantize_native(src: str | os.PathLike, out: str | os.PathLike, opts: QuantizeOptions,
                    report_path: str | os.PathLike | None = None) -> QuantizeResult:  # fmt: skip
    """Dynamic int8 of a native checkpoint (or a training run's ``model/``) in torch, measured against the fp32
    model; written to ``out`` only when no gated metric dropped by more than ``opts.max_drop``.

    Raises:
        FileNotFoundError: ``src`` is not a checkpoint.
        ValueError: a mode torch does not do here, or a checkpoint that is int8 already.
    """
    from ..models import load as load_native

    t0 = time.perf_counter()
    if opts.mode != "dynamic":
        raise ValueError(
            f"--runtime torch quantises --mode dynamic only; for {opts.mode} export the model first "
            f"(mmfusion export onnx --model {src} --out DIR) and quantise DIR on ONNX Runtime"
        )
    if opts.calibration:
        raise ValueError("--calibration calibrates --mode static, which runs on ONNX Runtime; drop it")
    ckpt = resolve_checkpoint(src)
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    if meta.get("quantize"):
        origin = (meta.get("quantized_from") or {}).get("path", "the fp32 checkpoint")
        raise ValueError(f"{src} is already {meta['quantize']}; quantise the fp32 checkpoint it came from ({origin})")
    out = Path(out)
    if out.resolve() in (Path(src).resolve(), ckpt.resolve()):
        raise ValueError("--out must differ from --model: the fp32 model is the reference the gate measures against")
    source = load_native(ckpt, device="cpu")
    fingerprint = weights_fingerprint(ckpt)
    target = native_int8(source, fingerprint, opts.per_channel)
    ds, labelled = gate_data(source, opts)
    before, after = verify.measure(source, ds, labelled), verify.measure(target, ds, labelled)
    tmp = staging_dir(out)
    try:
        for f in ckpt.iterdir():
            if f.is_file() and f.name != CONFIG_FILE:
                shutil.copy2(f, tmp / f.name)
        meta.update(
            quantize=INT8,
            per_channel=opts.per_channel,
            quantized_from={"path": str(ckpt.resolve()), "fingerprint": fingerprint},
        )
        atomic_write_json(tmp / CONFIG_FILE, meta)
        report = {
            "task": "quantize",
            "runtime": "torch",
            "source": str(src),
            "out": str(out),
            "mode": opts.mode,
            "per_channel": opts.per_channel,
            "calibration": None,
            **gate_report(before, after, ds, labelled, opts),
            "size_mb": {"before": round(_size_mb(ckpt), 2), "after": round(_size_mb(tmp), 2)},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        return conclude(report, tmp, out, report_path, "torch dynamic int8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
