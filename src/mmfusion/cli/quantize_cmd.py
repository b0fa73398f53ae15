"""``mmfusion quantize``: int8 (or fp16) of an ONNX export, or int8 of a native checkpoint in torch, written only
when it kept its retrieval (and zero-shot) quality."""

from __future__ import annotations

import argparse
import sys

from .common import command, positive_int

EXAMPLES = """
examples:
  mmfusion quantize --model runs/clip-onnx --out runs/clip-int8 --mode dynamic --verify shapes
  mmfusion quantize --model runs/clip-onnx --out runs/clip-int8s --mode static --calibration photos/ \\
      --verify my-captions/ --max-drop 0.02 --per-channel
  mmfusion quantize --model runs/clip-onnx --out runs/clip-fp16 --mode fp16 --verify shapes
  mmfusion quantize --model runs/clip --out runs/clip-int8-torch --verify shapes     # a native run: torch int8

The quantised model and its source both rank the --verify data (ShapesWorld's test split as the model was
trained on it, or a folder with captions.jsonl) and, where there are labels (ShapesWorld, the folder's
zeroshot/ class folders, or --labels), classify labelled images zero-shot. Recall@1/5/10 image->text and
text->image and zero-shot top-1, before and after, go to quantize_report.json and a bar plot beside the model.
When any of them drops by more than --max-drop, nothing is written to --out and the exit status is 1.
"""


def cmd_quantize(args: argparse.Namespace, extra: list[str]) -> int:
    from ..backends.ort import is_export_dir
    from ..config import ConfigError
    from ..export.quantize import QuantizeOptions, gate_summary, quantize_export

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion quantize --help")
    if args.calibration and args.mode != "static":
        raise ValueError(f"--calibration calibrates --mode static; --mode {args.mode} needs no data")
    opts = QuantizeOptions(
        mode=args.mode, per_channel=args.per_channel, calibration=args.calibration, calibration_n=args.calibration_n,
        verify=args.verify, n=args.n, split=args.split, labels=args.labels, zeroshot_per_class=args.zeroshot_per_class,
        max_drop=args.max_drop, threads=args.threads,
    )  # fmt: skip
    runtime = args.runtime
    if runtime == "auto":
        runtime = "onnx" if is_export_dir(args.model) or not _is_checkpoint(args.model) else "torch"
    if runtime == "torch":
        from ..export.quantize_torch import quantize_native

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = quantize_native(args.model, args.out, opts, report_path=args.report)
    else:
        result = quantize_export(args.model, args.out, opts, report_path=args.report)
    print("\n".join(gate_summary(result)), file=sys.stdout if result.passed else sys.stderr)
    return 0 if result.passed else 1


def _is_checkpoint(path: str) -> bool:
    from ..models.checkpoint import resolve_checkpoint  # the one rule of what a checkpoint is

    try:
        resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return True


def add_parser(sub) -> None:
    p = command(
        sub,
        "quantize",
        cmd_quantize,
        help="int8/fp16 of an ONNX export (or int8 of a native run in torch), kept only if it stays within --max-drop",
        description="Quantise an ONNX export (mmfusion export onnx) with ONNX Runtime, or a native checkpoint "
        "in torch (dynamic int8), measure retrieval Recall@K and zero-shot accuracy before and after on your "
        "data, and write the model with a report only when no metric dropped by more than --max-drop.",
        epilog=EXAMPLES,
    )
    p.add_argument("--model", required=True, help="an fp32 export directory (mmfusion export onnx --out DIR), or "
                   "a native checkpoint / training run for --runtime torch")  # fmt: skip
    p.add_argument("--out", required=True, help="the quantised model's directory (written only if it passes)")
    p.add_argument("--runtime", choices=["auto", "onnx", "torch"], default="auto",
                   help="onnx: ONNX Runtime's quantisers on an export; torch: dynamic int8 of a native checkpoint, "
                        "kept as the fp32 weights plus 'quantize: int8' in its config (every load quantises them "
                        "alike); auto (default): onnx for an export, torch for a checkpoint")  # fmt: skip
    p.add_argument("--mode", choices=["dynamic", "static", "fp16"], default="dynamic",
                   help="dynamic: int8 weights, activations quantised per call (no data needed); static: int8 "
                        "activations too, calibrated on --calibration images; fp16: half precision")  # fmt: skip
    p.add_argument("--calibration", help="static: a folder of images like yours (default: ShapesWorld train)")
    p.add_argument("--calibration-n", type=positive_int, default=128, help="static: calibration images (128)")
    p.add_argument("--per-channel", action="store_true", help="one int8 scale per output channel of each weight")
    p.add_argument("--verify", required=True,
                   help="the data the gate ranks: 'shapes' (ShapesWorld test, as the model was trained on it) or a "
                        "folder with captions.jsonl (or its test/ split)")  # fmt: skip
    p.add_argument("--n", type=positive_int, default=1000, help="images to rank when verifying (1000)")
    p.add_argument("--split", default="test", help="the verification split (ShapesWorld: test or heldout)")
    p.add_argument("--labels", help="labelled images for the zero-shot part of the gate: 'shapes', a folder of "
                   "class folders, or 'none' (default: --verify's own: ShapesWorld's classes, or the folder's "
                   "zeroshot/)")  # fmt: skip
    p.add_argument("--zeroshot-per-class", type=int, default=20, help="labelled images per class (20; 0: none)")
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="the most any gated metric (Recall@K, zero-shot top-1) may fall, as a fraction "
                        "(0.01 = one point)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime (or torch) threads (default: the physical "
                   "cores)")  # fmt: skip
    p.add_argument("--report", help="also write the JSON report here, passed or refused (for CI logs)")
