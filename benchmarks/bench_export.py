"""mmfusion's own CLIP on ONNX Runtime against torch: fp32, int8 dynamic and int8 static, speed and the R@10 each
keeps on ShapesWorld.

Two models:

* ``clip-tiny`` (64 px ViT), trained here for ``--train-time`` on ShapesWorld (cached in
  ``runs/bench-export/clip-tiny``), so that R@10 means something;
* the ViT-B/32 geometry (``vit-b-32``: 224 px, 12 x 768 image tower, 12 x 512 text tower) with random weights
  and a ShapesWorld tokenizer: a speed figure at a real size (its R@10 is at chance; the cosine of its int8
  embeddings to fp32 ones is the quality figure there).

Each is exported (``mmfusion export onnx``) and quantised (``mmfusion quantize``: int8 dynamic, int8 static
calibrated on 128 ShapesWorld train images, and fp16; the gate is opened wide here, ``--max-drop 1``, so every
variant is measured; the exports and their reports are kept in ``runs/bench-export`` and reused unless ``--fresh``).
Images/s of the image tower at batch 1 and 32 on preprocessed pixels (preprocessing is the same
NumPy/Pillow for every variant): torch fp32 eager ``encode_image`` vs ONNX Runtime, the variants alternating,
median of ``--repeats``. R@10 (image->text and text->image) on the ShapesWorld test split through the project's
retrieval metrics (``mmfusion.export.verify``).

Run: python benchmarks/bench_export.py [--train-time 60s] [--repeats 5] [--json runs/bench-export.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from PIL import Image

import mmfusion
from mmfusion.backends.ort import OrtEmbedder, is_export_dir
from mmfusion.export import export_onnx, verify
from mmfusion.export.quantize import REPORT_JSON, QuantizeOptions, quantize_export
from mmfusion.export.quantize_torch import quantize_native

ROOT = Path("runs/bench-export")
LABELS = {"dynamic": "ORT int8 dynamic", "static": "ORT int8 static", "fp16": "ORT fp16", "torch": "torch int8 dynamic"}


def trained_clip_tiny(train_time: str, threads: int) -> Path:
    """clip-tiny trained for ``train_time`` on the ShapesWorld stream (reused when already there)."""
    out = ROOT / "clip-tiny"
    if (out / "model" / "config.json").is_file():
        return out
    from mmfusion.train import RunConfig, TrainConfig, train

    train(RunConfig(preset="clip-tiny", train=TrainConfig(time=train_time, progress=False, threads=threads),
                    out=str(out)))  # fmt: skip
    return out


def random_vit_b32() -> Path:
    """The vit-b-32 preset with random weights and a ShapesWorld tokenizer, as a checkpoint."""
    out = ROOT / "vit-b-32"
    if (out / "config.json").is_file():
        return out
    from mmfusion.data.shapes import ShapesWorld
    from mmfusion.data.tokenizer import Tokenizer
    from mmfusion.models import create_model, save_model

    world = ShapesWorld()
    texts = ShapesWorld.vocabulary_texts() + [c.text for i in range(2000) for c in world.sample("train", i).captions]
    torch.manual_seed(0)
    save_model(create_model("vit-b-32", Tokenizer.train(texts, 1024, 77)), out)
    return out


def rates(fns: dict[str, Callable[[], object]], n_items: int, repeats: int, budget_s: float) -> dict[str, float]:
    """Items/s of each function, alternating, median over repeats (fewer when a call is slow)."""
    for fn in fns.values():
        fn()  # warm-up
    t0 = time.perf_counter()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            s = time.perf_counter()
            fn()
            samples[k].append(n_items / (time.perf_counter() - s))
        if r >= 2 and time.perf_counter() - t0 > budget_s:
            break
    return {k: round(statistics.median(v), 1) for k, v in samples.items()}


def bench_model(name: str, ckpt: Path, args) -> dict:
    t0 = time.perf_counter()
    model = mmfusion.load(ckpt)
    export = ROOT / f"{name}-onnx"
    fresh = args.fresh or not is_export_dir(export)
    if fresh:
        export_onnx(ckpt, export)
    variants: dict[str, OrtEmbedder] = {"ORT fp32": OrtEmbedder(export, threads=args.threads)}
    reports = {}
    for mode in ("dynamic", "static", "fp16"):
        out = ROOT / f"{name}-{mode}"
        if fresh or not (out / REPORT_JSON).is_file():  # the report holds R@K before and after, measured once
            opts = QuantizeOptions(mode=mode, n=args.n, max_drop=1.0, threads=args.threads, calibration_n=128)
            quantize_export(export, out, opts)
        reports[mode] = json.loads((out / REPORT_JSON).read_text())
        variants[LABELS[mode]] = OrtEmbedder(out, threads=args.threads)
    torch_int8 = ROOT / f"{name}-torch-int8"
    if fresh or not (torch_int8 / REPORT_JSON).is_file():  # the same gate, in torch (mmfusion quantize --runtime torch)
        quantize_native(ckpt, torch_int8, QuantizeOptions(n=args.n, max_drop=1.0))
    reports["torch"] = json.loads((torch_int8 / REPORT_JSON).read_text())
    model_int8 = mmfusion.load(torch_int8)
    print(f"{name}: exported and quantised in {time.perf_counter() - t0:.0f}s", flush=True)

    ds = verify.verification_set(model, "shapes", args.n)
    images = [Image.fromarray(a) for a in ds.images[:32]]
    pixels = model.transform(images)  # (32, 3, S, S), the same for every variant
    speed = {}
    for batch in (1, 32):
        x_t, x_n = pixels[:batch], pixels[:batch].numpy()

        def torch_call(x=x_t, m=model):
            with torch.inference_mode():
                m.encode_image(x)

        fns = {"torch fp32 eager": torch_call, LABELS["torch"]: lambda x=x_t: torch_call(x, model_int8)}
        fns |= {k: (lambda e=e, x=x_n: e.encode_image(x)) for k, e in variants.items()}
        speed[batch] = rates(fns, batch, args.repeats if batch > 1 else args.repeats * 4, args.budget)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v}" for k, v in speed[batch].items()), flush=True)

    quality = {"torch fp32 eager": verify.measure(model, ds).metrics}
    quality["ORT fp32"] = reports["dynamic"]["gate"]["before"]
    for mode, report in reports.items():
        quality[LABELS[mode]] = report["gate"]["after"]
    cos = {LABELS[m]: r["gate"]["cosine_to_before"] for m, r in reports.items()}
    rows = {}
    for k in ["torch fp32 eager", LABELS["torch"], *variants]:
        rows[k] = {
            "images/s batch 1": speed[1][k],
            "images/s batch 32": speed[32][k],
            "i2t_R@10": round(quality[k]["i2t_R@10"], 4),
            "t2i_R@10": round(quality[k]["t2i_R@10"], 4),
            "x torch (batch 32)": round(speed[32][k] / speed[32]["torch fp32 eager"], 2),
        }
        if k in cos:
            rows[k]["cosine to fp32 (images mean/min, texts mean/min)"] = [
                cos[k]["images"]["mean"], cos[k]["images"]["min"], cos[k]["texts"]["mean"], cos[k]["texts"]["min"]
            ]  # fmt: skip
    sizes = {m: reports[m]["size_mb"] for m in reports}
    return {"rows": rows, "size_mb": sizes, "n_images": len(ds.images), "seconds": round(time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-time", default="60s", help="clip-tiny's training budget (when not cached)")
    ap.add_argument("--models", default="clip-tiny,vit-b-32")
    ap.add_argument("--n", type=int, default=500, help="ShapesWorld test images ranked for R@10")
    ap.add_argument("--n-large", type=int, default=200, help="the same for vit-b-32 (slower)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per model and batch size, at most")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for torch and ONNX Runtime alike")
    ap.add_argument("--fresh", action="store_true", help="export and quantise again even when runs/ has them")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ROOT.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        if name == "clip-tiny":
            ckpt = trained_clip_tiny(args.train_time, args.threads)
            results[name] = bench_model(name, ckpt, args)
        else:
            n, args.n = args.n, args.n_large
            results[name] = bench_model(name, random_vit_b32(), args)
            args.n = n
        print(json.dumps(results[name], indent=1), flush=True)
    if args.json:
        import onnxruntime

        meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} threads",
                "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta | {"results": results}, indent=2))


if __name__ == "__main__":
    main()
