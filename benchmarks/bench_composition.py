"""Composition over seeds: clip-tiny's recipes trained side by side, each scored on the compositional benchmark
(``mmfusion eval composition``), retrieval and single-object zero-shot.

    python benchmarks/bench_composition.py --arms base-3m hn2-5m --seeds 0 1 2 --json runs/bench-composition.json

Arms (name: training): ``base-3m`` / ``base-5m``: clip-tiny as `mmfusion train clip --time 3m|5m`; ``hn2-5m``:
`recipes/clip-composition.yaml` (two hard negative captions per image, NegCLIP-style) for 5 minutes. Per seed
the arms run one after the other, so the machine's load falls on all of them; a run already complete in
``runs/comp/ARM-sSEED`` (its model written) is scored again, not retrained (``--retrain`` to train anyway).
Reported per arm: the median over seeds of each composition type's accuracy (image->text / text->image), R@10
both ways and semantic P@1 on 1,000 test scenes, and zero-shot top-1 on the 48 single-object classes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from datetime import date
from pathlib import Path

import mmfusion
from mmfusion.config import from_dict, load_yaml
from mmfusion.eval.composition import evaluate_composition
from mmfusion.eval.report import evaluate_retrieval, evaluate_zeroshot
from mmfusion.train.config import RunConfig, TrainConfig
from mmfusion.train.run import train

ROOT = Path("runs/comp")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "clip-composition.yaml"
ARMS = {"base-3m": (None, "3m"), "base-5m": (None, "5m"), "hn2-5m": (RECIPE, "5m")}


def run_arm(arm: str, seed: int, retrain: bool) -> tuple[Path, int | None]:
    recipe, budget = ARMS[arm]
    run = ROOT / f"{arm}-s{seed}"
    if (run / "model" / "config.json").is_file() and not retrain:
        return run, None
    shutil.rmtree(run, ignore_errors=True)
    data = load_yaml(recipe) if recipe else {"preset": "clip-tiny"}
    data = {**data, "out": str(run)}
    cfg = from_dict(RunConfig, data)
    cfg.train = TrainConfig(**{**cfg.train.__dict__, "time": budget, "steps": None, "seed": seed, "progress": False})
    return run, train(cfg).steps


def score(run: Path) -> dict:
    model = mmfusion.load(run)
    comp = evaluate_composition(model, n=500, progress=False)
    ret = evaluate_retrieval(model, "shapes", 1000, progress=False)["metrics"]
    zs = evaluate_zeroshot(model, "shapes", progress=False)
    types = {t: [v["i2t"]["accuracy"], (v.get("t2i") or {}).get("accuracy")] for t, v in comp["types"].items()}
    return {"types": types, "R@10": [ret["i2t_R@10"], ret["t2i_R@10"]], "semantic_P@1": ret["semantic_P@1"],
            "zeroshot_top1": zs["groups"]["seen"]["top1"]}  # fmt: skip


def median(rows: list[dict]) -> dict:
    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 4) if values else None

    types = {t: [med([r["types"][t][k] for r in rows]) for k in (0, 1)] for t in rows[0]["types"]}
    return {"types": types, "R@10": [med([r["R@10"][k] for r in rows]) for k in (0, 1)],
            "semantic_P@1": med([r["semantic_P@1"] for r in rows]),
            "zeroshot_top1": med([r["zeroshot_top1"] for r in rows])}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["base-3m", "hn2-5m"], choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--retrain", action="store_true", help="train every arm again, even when its run is complete")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out: dict = {"date": date.today().isoformat(), "arms": {a: [] for a in args.arms}}
    for seed in args.seeds:
        for arm in args.arms:
            run, steps = run_arm(arm, seed, args.retrain)
            row = {"seed": seed, "run": str(run), "steps": steps, **score(run)}
            out["arms"][arm].append(row)
            print(f"{arm} seed {seed}: {json.dumps(row)}", flush=True)
    out["median"] = {arm: median(rows) for arm, rows in out["arms"].items()}
    print(json.dumps(out["median"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
