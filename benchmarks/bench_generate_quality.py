"""Quality of the native captioner and VQA model on held-out ShapesWorld, within a CPU time budget.

The recipe, per seed: train clip-tiny on the ShapesWorld stream for ``--clip-budget`` (3 minutes), then
train caption-tiny for ``--caption-budget`` (7 minutes; 10 in all) with its image encoder initialised from
that CLIP and fine-tuned; then fine-tune that captioner on questions for ``--vqa-budget`` (VQA by
generation, captions still mixed in, no single-object curriculum: the captioner has seen crowded scenes).
``--vqa-from clip`` instead trains the vqa-tiny classifier from the CLIP. The captioner is scored on
``--caption-n`` held-out test scenes (BLEU-1..4, CIDEr-D, attribute accuracy: every object's colour and
shape named, nothing extra), the answerer on ``--vqa-n`` held-out questions (accuracy overall and per
question type). With ``--scratch``, the captioner is also trained from scratch for the whole budget
(clip + caption), the comparison that shows what the CLIP initialisation brings.

Every run is reported, and the median over seeds.

Run: python benchmarks/bench_generate_quality.py [--seeds 0 1 2] [--scratch] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
from datetime import date
from pathlib import Path

import torch

import mmfusion
from mmfusion.eval.captioning import evaluate_captioner
from mmfusion.eval.vqa import evaluate_answerer
from mmfusion.train import RunConfig, TrainConfig, train
from mmfusion.train.config import InitConfig

CAPTION_KEYS = ("BLEU-1", "BLEU-4", "CIDEr", "attribute_accuracy")


def seconds(budget: str) -> float:
    unit = {"s": 1, "m": 60, "h": 3600}[budget[-1]] if budget[-1] in "smh" else 1
    return float(budget.rstrip("smh")) * unit


def run(task: str, out: Path, budget: str, seed: int, init: str | None = None, captioner: str | None = None,
        reuse: bool = False) -> float:  # fmt: skip
    if reuse and (out / "model" / "config.json").is_file():
        return float("nan")
    shutil.rmtree(out, ignore_errors=True)  # each benchmark run starts fresh
    cfg = RunConfig(task=task, out=str(out), train=TrainConfig(time=budget, seed=seed, progress=False))
    if task != "clip":
        cfg.preset = f"{task}-tiny"
        cfg.init = InitConfig(from_clip=init)
    if captioner:  # VQA by generation, fine-tuning a captioner
        cfg.preset, cfg.init = "caption-tiny", InitConfig(from_captioner=captioner)
        cfg.data.shapes.curriculum = 0
    return train(cfg).elapsed_s


def caption_scores(out: Path, n: int) -> dict:
    r = evaluate_captioner(mmfusion.load(out), "shapes", n=n, out=out / "eval")
    return {k: r["metrics"][k] for k in CAPTION_KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--clip-budget", default="3m")
    ap.add_argument("--caption-budget", default="7m")
    ap.add_argument("--vqa-budget", default="10m")
    ap.add_argument("--caption-n", type=int, default=500)
    ap.add_argument("--vqa-n", type=int, default=1000)
    ap.add_argument("--scratch", action="store_true", help="also a captioner from scratch for the whole budget")
    ap.add_argument("--no-vqa", action="store_true")
    ap.add_argument(
        "--vqa-from",
        choices=("captioner", "clip"),
        default="captioner",
        help="fine-tune the captioner on questions (generation), or train the classifier from the CLIP",
    )
    ap.add_argument("--reuse", action="store_true", help="keep CLIP and captioner runs already in --work")
    ap.add_argument("--work", default="runs/bench-generate", help="where the runs are written")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    results: dict = {"date": date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "load_start": os.getloadavg()[0], "budgets": {"clip": args.clip_budget,
                     "caption": args.caption_budget, "vqa": args.vqa_budget}, "runs": []}  # fmt: skip
    whole = f"{int(seconds(args.clip_budget) + seconds(args.caption_budget))}s"
    for seed in args.seeds:
        row: dict = {"seed": seed}
        clip = work / f"clip-{seed}"
        row["clip_s"] = run("clip", clip, args.clip_budget, seed, reuse=args.reuse)
        row["caption_s"] = run("caption", work / f"caption-{seed}", args.caption_budget, seed, init=str(clip),
                               reuse=args.reuse)  # fmt: skip
        row["caption"] = caption_scores(work / f"caption-{seed}", args.caption_n)
        print(f"seed {seed}: CLIP {row['clip_s']:.0f}s + captioner {row['caption_s']:.0f}s -> "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["caption"].items()), flush=True)  # fmt: skip
        if args.scratch:
            run("caption", work / f"caption-scratch-{seed}", whole, seed)
            row["caption_scratch"] = caption_scores(work / f"caption-scratch-{seed}", args.caption_n)
            print(f"seed {seed}: captioner from scratch, {whole} -> "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row["caption_scratch"].items()), flush=True)  # fmt: skip
        if not args.no_vqa:
            captioner = str(work / f"caption-{seed}") if args.vqa_from == "captioner" else None
            row["vqa_s"] = run("vqa", work / f"vqa-{seed}", args.vqa_budget, seed, init=str(clip), captioner=captioner)
            row["vqa_from"] = args.vqa_from
            r = evaluate_answerer(mmfusion.load(work / f"vqa-{seed}"), "shapes", n=args.vqa_n,
                                  out=work / f"vqa-{seed}" / "eval")  # fmt: skip
            row["vqa"] = {"overall": r["metrics"]["accuracy"], **r["metrics"]["per_type"]}
            print(f"seed {seed}: VQA {row['vqa_s']:.0f}s -> "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row["vqa"].items()), flush=True)  # fmt: skip
        results["runs"].append(row)
    median: dict = {}
    for part in ("caption", "caption_scratch", "vqa"):
        rows = [r[part] for r in results["runs"] if part in r]
        if rows:
            median[part] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    results["median"] = median
    print("median over seeds:", json.dumps(median, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
