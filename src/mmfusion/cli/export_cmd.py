"""``mmfusion export onnx``: a CLIP's image and text towers to ONNX, with its tokenizer and preprocessing, for
ONNX Runtime (``mmfusion.load(DIR)`` then runs it without PyTorch)."""

from __future__ import annotations

import argparse

from .common import command

EXAMPLES = """
examples:
  mmfusion export onnx --model runs/clip --out runs/clip-onnx
  mmfusion export onnx --model clip-tiny --out /tmp/clip-tiny-onnx      # an untrained preset (no tokenizer)
  mmfusion export onnx --model hf:openai/clip-vit-base-patch32 --out runs/b32-onnx   # CLIP or SigLIP
  mmfusion quantize --model runs/clip-onnx --out runs/clip-int8 --mode dynamic --verify shapes

The directory holds image.onnx and text.onnx (dynamic batch axes; the text tower also takes shorter
sequences), tokenizer.json, and export.json: image size, mean/std, crop, token ids, embedding width and
logit scale. mmfusion.load(DIR), --model DIR and the service run it on ONNX Runtime, without torch.
"""


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError
    from ..export import export_onnx

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion export --help")
    cfg = export_onnx(args.model, args.out, opset=args.opset)
    tok = "tokenizer.json" if cfg["text"]["tokenizer"] else "no tokenizer (an untrained preset: texts must be ids)"
    side = cfg["image"].get("input_size") or cfg["image"]["size"]
    print(
        f"exported {cfg['source']} to {args.out} in {cfg['seconds']:.1f}s: image.onnx ({side} px), text.onnx, "
        f"{tok}; {cfg['embed_dim']}-d embeddings, opset {cfg['opset']}, checked by onnx.checker"
    )
    print(f"  run it: mmfusion.load({args.out!r}); quantise it: mmfusion quantize --model {args.out} --out "
          f"{args.out}-int8 --verify shapes")  # fmt: skip
    return 0


def add_parser(sub) -> None:
    p = command(
        sub,
        "export",
        cmd_export,
        help="export a CLIP to ONNX (runs on ONNX Runtime without torch)",
        description="Export a CLIP's image and text towers (a native one, or a pretrained CLIP/SigLIP) to "
        "ONNX, checked by onnx.checker, with its tokenizer and preprocessing config beside them.",
        epilog=EXAMPLES,
    )
    p.add_argument("format", choices=["onnx"], help="the format (onnx)")
    p.add_argument("--model", required=True, help="a training run or checkpoint directory, a preset name, or a "
                   "pretrained CLIP/SigLIP (hf:<hub-id>, hf:<dir>)")  # fmt: skip
    p.add_argument("--out", required=True, help="the export directory (an older export there is replaced)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
