"""How much of the first stage's cosine a captioner re-ranker should add to its likelihood.

A captioner knows binding, relations and regions; the CLIP of the first stage knows single objects and counts:
the re-ranked score is the caption's log-likelihood plus ``weight`` x the CLIP's cosine. This measures semantic
P@1 of text-to-image retrieval with the CLIP's top K re-ranked, for each weight, on ShapesWorld's validation
split (never the test split the figures are quoted on). The shipped weight
(``mmfusion.models.caption_ranker.FIRST_STAGE_WEIGHT``) was chosen this way.

Run: python benchmarks/bench_rerank_weight.py --reranker runs/rerank/captioner [--clip runs/bench-compress/teacher]
     [--weights 0 13 26 50 79 105] [--n 1000] [--k 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from mmfusion.eval.rerank import rerank_retrieval
from mmfusion.models import load
from mmfusion.models.caption_ranker import as_reranker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reranker", required=True, help="a captioner run (or a cross-attention re-ranker run)")
    ap.add_argument("--clip", default="runs/bench-compress/teacher", help="the first stage")
    ap.add_argument("--weights", type=float, nargs="+", default=[0, 13, 26, 50, 79, 105])
    ap.add_argument("--n", type=int, default=1000, help="validation scenes (5 captions each)")
    ap.add_argument("--k", type=int, default=20, help="results re-ranked per query")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reranker = as_reranker(load(args.reranker).eval(), args.reranker)
    r = rerank_retrieval(reranker, load(args.clip).eval(), n=args.n, split="val", k=args.k, weights=args.weights)
    result = {"date": str(date.today()), "reranker": args.reranker, "clip": args.clip, "split": "val", "n": args.n,
              "k": args.k, "first_stage_alone": r["semantic_P@1"]["before"],
              "semantic_P@1_by_weight": r["semantic_P@1_by_weight"]}  # fmt: skip
    print(f"semantic P@1 of the top {args.k} re-ranked, ShapesWorld validation split ({args.n} scenes); "
          f"the first stage alone {result['first_stage_alone']:.3f}")  # fmt: skip
    best = max(r["semantic_P@1_by_weight"].items(), key=lambda kv: kv[1])[0]
    for w, p in r["semantic_P@1_by_weight"].items():
        print(f"  weight {float(w):7.1f}   {p:.3f}{'   <- best' if w == best else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
