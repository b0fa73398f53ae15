"""Distillation and pruning against their bars, on ShapesWorld, median of seeds, the arms side by side.

* ``distill``: a clip-nano student distilled from a trained clip-tiny teacher (``mmfusion distill``; with
  ``--arms inherited`` also one started from the teacher's weights, ``--inherit``) against the same student trained
  alone (``mmfusion train clip --preset clip-nano``), the same wall-clock each, the arms
  alternating per seed so the machine's load falls on both; R@10 both ways and semantic P@1 on 1,000 test
  scenes, and the image-encoding cost of student and teacher (images/s, one thread).
* ``prune``: the teacher with 30% of heads and MLP channels removed and ``--recover`` of fine-tuning with the
  teacher as its teacher (``mmfusion prune``), per seed (which batches measure importance, and the recovery's
  seed): R@10 and semantic P@1 before and after, image-encoding speed-up.
* ``sweep``: one seed pruned at 10/30/50/70% (each recovered for ``--sweep-recover``): the quality/speed curve.

Run: python benchmarks/bench_compress.py --teacher runs/bench-compress/teacher --json runs/bench-compress.json
(the teacher: mmfusion train clip --time 5m --out runs/bench-compress/teacher)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
from datetime import date
from pathlib import Path

import torch

import mmfusion
from mmfusion.eval.report import evaluate_retrieval
from mmfusion.train.config import DistillConfig, RunConfig, TrainConfig
from mmfusion.train.prune_run import PruneOptions, image_rate, prune_run
from mmfusion.train.run import train

ROOT = Path("runs/bench-compress")
KEYS = ("i2t_R@10", "t2i_R@10", "semantic_P@1")


def quality(model, n: int) -> dict[str, float]:
    m = evaluate_retrieval(model, "shapes", n, progress=False)["metrics"]
    return {k: round(float(m[k]), 4) for k in KEYS}


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 4)


def distill_part(args) -> dict:
    teacher = mmfusion.load(args.teacher)
    out: dict = {"teacher": quality(teacher, args.n), "student_time": args.student_time,
                 "arms": {arm: [] for arm in args.arms}}  # fmt: skip
    for seed in args.seeds:
        for arm in args.arms:
            # the default budget keeps its old folder names; another budget gets its own folders
            budget = "" if args.student_time == "3m" else f"-{args.student_time}"
            run = ROOT / f"nano-{arm}{budget}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)  # each arm trains from nothing in its own wall-clock
            cfg = RunConfig(preset="clip-nano", train=TrainConfig(time=args.student_time, seed=seed, progress=False),
                            out=str(run))  # fmt: skip
            if arm != "alone":  # inherited: distilled, starting from the teacher's blocks, heads and channels
                cfg.distill = DistillConfig(teacher=str(args.teacher), inherit=arm == "inherited")
            result = train(cfg)
            student = mmfusion.load(run)
            row = {"seed": seed, "steps": result.steps, **quality(student, args.n)}
            out["arms"][arm].append(row)
            print(f"distill seed {seed} {arm}: {row}", flush=True)
    student = mmfusion.load(run)
    out["images_per_s"] = image_rate({"teacher": teacher, "student": student})
    out["median"] = {arm: {k: median(rows, k) for k in (*KEYS, "steps")} for arm, rows in out["arms"].items()}
    return out


def prune_part(args) -> dict:
    rows = []
    for seed in args.seeds:
        opts = PruneOptions(heads=0.3, mlp=0.3, recover=args.recover, seed=seed, eval_n=args.n,
                            overrides=(f"--train.seed={seed}", "--train.progress=false"))  # fmt: skip
        rep = prune_run(str(args.teacher), ROOT / f"prune30-s{seed}", opts)
        row = {"seed": seed, "speedup": rep["speedup"], "images_per_s": rep["images_per_s"],
               "before": rep["quality"]["before"], "after": rep["quality"]["after"],
               "parameters": rep["kept"]["parameters"]}  # fmt: skip
        rows.append(row)
        print(f"prune seed {seed}: {row}", flush=True)
    drops = {k: statistics.median(r["before"][k] - r["after"][k] for r in rows) for k in KEYS}
    return {"rows": rows, "median_drop": {k: round(v, 4) for k, v in drops.items()},
            "median_speedup": round(statistics.median(r["speedup"] for r in rows), 3)}  # fmt: skip


def sweep_part(args) -> dict:
    opts = PruneOptions(recover=args.sweep_recover, eval_n=args.n, sweep=(0.1, 0.3, 0.5, 0.7),
                        overrides=("--train.progress=false",))  # fmt: skip
    return prune_run(str(args.teacher), ROOT / "sweep", opts)


def speed_part(args) -> dict:
    """Image encoding of the teacher and every pruned model, all side by side in one measurement (one thread,
    alternating, median of ``--speed-repeats``): the speed figures the bars and the curve quote."""
    models = {"teacher": mmfusion.load(args.teacher)}
    for d in sorted(ROOT.glob("prune30-s*")) + sorted((ROOT / "sweep").glob("ratio-*")):
        models[d.name] = mmfusion.load(d)
    rates = image_rate(models, repeats=args.speed_repeats)
    return {"images_per_s": rates, "x_teacher": {k: round(v / rates["teacher"], 3) for k, v in rates.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=ROOT / "teacher")
    parts = ["distill", "prune", "sweep", "speed"]
    ap.add_argument("--part", nargs="+", default=parts, choices=parts)
    ap.add_argument("--speed-repeats", type=int, default=40, help="timed batches per model in the speed part")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student-time", default="3m", help="each student's wall-clock (distilled or alone)")
    ap.add_argument("--arms", nargs="+", default=["distilled", "alone"], choices=["distilled", "inherited", "alone"],
                    help="distill's arms: distilled from a random start, inherited (distilled from the teacher's "
                    "weights, --inherit), alone (no teacher)")  # fmt: skip
    ap.add_argument("--recover", default="2m", help="pruning's recovery")
    ap.add_argument("--sweep-recover", default="1m", help="the recovery of each point of the sweep")
    ap.add_argument("--n", type=int, default=1000, help="ShapesWorld test scenes ranked")
    ap.add_argument("--json", help="write the results here (each part merged into what the file holds)")
    args = ap.parse_args()
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    results |= {"date": date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__,
                "teacher": str(args.teacher)}  # fmt: skip
    for part in args.part:
        run = {"distill": distill_part, "prune": prune_part, "sweep": sweep_part, "speed": speed_part}[part]
        results[part] = run(args)
        print(json.dumps(results[part], indent=1)[:3000], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
