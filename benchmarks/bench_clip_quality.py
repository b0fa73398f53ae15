"""Quality of the clip-tiny preset after a fixed wall-clock budget on this machine.

For each seed: train on the in-memory ShapesWorld stream for the budget, then evaluate retrieval on
1,000 held-out test scenes and zero-shot classification over all 48 shape-colour classes (seen and
held-out combinations apart). Reports every run and the median over seeds. With --folder, also trains
once on an exported ShapesWorld folder (the on-disk format) and evaluates it the same way.

Run: python benchmarks/bench_clip_quality.py --budget 3m --seeds 0 1 2 --folder [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import mmfusion
from mmfusion.data.export import export_shapes
from mmfusion.data.shapes import ShapesWorld
from mmfusion.eval import evaluate_retrieval, evaluate_zeroshot
from mmfusion.train import RunConfig, TrainConfig, train

KEYS = (
    "i2t_R@1",
    "i2t_R@10",
    "t2i_R@1",
    "t2i_R@10",
    "semantic_P@1",
    "semantic_P@5",
    "zs_seen_top1",
    "zs_heldout_top1",
    "zs_seen_top5",
    "zs_heldout_top5",
)


def one_run(out: Path, budget: str, seed: int, source: str, overrides: list[str]) -> dict:
    from mmfusion.config import apply_overrides

    shutil.rmtree(out, ignore_errors=True)  # a benchmark run starts fresh each time
    cfg = RunConfig(out=str(out), train=TrainConfig(time=budget, seed=seed, progress=False))
    cfg.data.source = source
    cfg = apply_overrides(cfg, overrides)
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    model = mmfusion.load(out)
    r = evaluate_retrieval(model, "shapes", n=1000, out=out / "eval", progress=False)
    z = evaluate_zeroshot(model, "shapes", per_class=50, out=out / "eval", progress=False)
    g = z["groups"]
    m = {
        **r["metrics"],
        "zs_seen_top1": g["seen"]["top1"],
        "zs_heldout_top1": g["heldout"]["top1"],
        "zs_seen_top5": z["groups"]["seen"]["top5"],
        "zs_heldout_top5": z["groups"]["heldout"]["top5"],
        "zs_seen_shape_acc": z["groups"]["seen"]["shape_acc"],
        "captions_unique": r["captions_unique_fraction"],
    }
    return {
        "seed": seed,
        "source": source,
        "steps": res.steps,
        "samples": res.samples,
        "train_s": round(train_s, 1),
        "samples_per_s": round(res.samples / res.elapsed_s, 1),
        "metrics": m,
        "semantic_P@1_by_caption_kind": r.get("by_caption_kind", {}).get("semantic_P@1"),
        "top1_misses_by_caption_kind": r.get("by_caption_kind", {}).get("top1_misses"),
    }


def show(run: dict) -> str:
    m = run["metrics"]
    head = f"seed {run['seed']} {Path(run['source']).name:12s} {run['steps']:4d} steps {run['samples_per_s']:5.0f}/s"
    return head + " | " + " ".join(f"{k} {m[k]:.3f}" for k in KEYS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="3m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folder", action="store_true", help="also train on an exported folder")
    ap.add_argument(
        "--folder-train",
        type=int,
        default=120_000,
        help="scenes in the exported training folder (3 minutes see about 110,000: one epoch, as the stream)",
    )
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*", help="config overrides such as train.batch_size=128")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    runs = []
    for seed in args.seeds:
        runs.append(one_run(out / f"stream-seed{seed}", args.budget, seed, "shapes", args.overrides))
        print(show(runs[-1]), flush=True)
    median = {k: statistics.median(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]}
    print("median over seeds: " + " ".join(f"{k} {median[k]:.3f}" for k in KEYS), flush=True)
    result = {
        "date": date.today().isoformat(),
        "budget": args.budget,
        "torch_threads": torch.get_num_threads(),
        "overrides": args.overrides,
        "runs": runs,
        "median": median,
    }
    if args.folder:
        data = out / "shapesworld"
        if not (data / "train" / "captions.jsonl").is_file():
            export_shapes(ShapesWorld(), data, {"train": args.folder_train}, zeroshot_per_class=0, progress=False)
        folder_run = one_run(out / "folder-seed0", args.budget, args.seeds[0], str(data), args.overrides)
        print(show(folder_run), flush=True)
        result["folder"] = folder_run
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
