"""``mmfusion eval KIND``: retrieval, zero-shot, composition, fusion, captioning and VQA reports of any model, as
JSON and plots; the kinds come from the model registry."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..config import ConfigError
from .common import LazyChoices, add_model_options, command, load_model


def _eval_out(model_path: str, out: str | None) -> Path:
    if out:
        return Path(out)
    if model_path.startswith("hf:") and not Path(model_path[3:]).expanduser().is_dir():
        return Path("runs") / "eval" / re.sub(r"[^A-Za-z0-9._-]+", "_", model_path[3:])  # a hub id
    p = Path(model_path.removeprefix("hf:")).expanduser()
    return (p / "eval") if (p / "model").is_dir() else p.parent / f"{p.name}-eval"


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion eval --help")
    model = load_model(args)
    kind = args.kind
    from ..models.registry import FAMILIES

    spec = FAMILIES.get(getattr(model, "family", None))
    if spec is not None and len(spec.eval_kinds) == 1 and kind not in spec.eval_kinds:
        kind = spec.eval_kinds[0]  # a family with one report (a fusion classifier) gets it
        print(f"mmfusion: a {spec.name} model is measured by `eval {kind}`", file=sys.stderr)
    if args.n is None:
        args.n = 500 if kind == "composition" else 1000
    return RUNNERS[kind](model, args, _eval_out(args.model, args.out))


def _eval_embedding(model, args: argparse.Namespace, out: Path) -> int:
    """Retrieval Recall@K and semantic precision, and zero-shot accuracy with a prompt ensemble."""
    from ..data.prompts import read_templates
    from ..eval.report import evaluate_retrieval, evaluate_zeroshot, summary_lines, write_report

    kinds = ["retrieval", "zeroshot"] if args.kind == "all" else [args.kind]
    templates = read_templates(args.templates) if args.templates else None
    for kind in kinds:
        if kind == "retrieval":
            report = evaluate_retrieval(model, args.data, n=args.n, split=args.split, out=out, progress=not args.quiet)
            if args.rerank:
                from ..eval.rerank import rerank_retrieval

                report["rerank"] = rerank_retrieval(_reranker(args.rerank), model, args.data, args.n, args.split,
                                                    args.rerank_k)  # fmt: skip
        else:
            report = evaluate_zeroshot(
                model, args.data, per_class=args.per_class, templates=templates, out=out, progress=not args.quiet
            )
        path = out / f"{kind}.json"
        if args.json:
            path = (
                Path(args.json) if len(kinds) == 1 else Path(args.json).with_name(f"{Path(args.json).stem}_{kind}.json")
            )
        write_report(report, path)
        print("\n".join(summary_lines(report)))
        if "rerank" in report:
            from ..eval.rerank import reranked_lines

            print("\n".join(reranked_lines(report["rerank"])))
        print(f"  report: {path}")
    return 0


def _reranker(path: str):
    from ..models.caption_ranker import as_reranker
    from ..models.checkpoint import load

    return as_reranker(load(path), f"--rerank {path}")


def _eval_composition(model, args: argparse.Namespace, out: Path) -> int:
    """True captions against hard negatives by type (ARO/SugarCrepe-style), image to text and text to image."""
    from ..eval.composition import evaluate_composition, summary_lines
    from ..eval.report import write_report
    from ..interfaces import Embedder
    from ..models.caption_ranker import RERANKING_FAMILIES, as_reranker

    reranker = _reranker(args.rerank) if args.rerank else None
    if getattr(model, "family", None) in RERANKING_FAMILIES:  # `eval composition --model RERANK_RUN`
        if args.rerank:
            raise ValueError(f"{args.model} is itself a re-ranker: give it as --model or as --rerank, not both")
        reranker = as_reranker(model)
    if reranker is not None:
        return _compare_composition(reranker, args, out)
    if not isinstance(model, Embedder):
        raise ValueError(f"{args.model} does not embed images and texts; `eval composition` needs an embedder")
    report = evaluate_composition(model, args.data, n=args.n, split=args.split, out=out, progress=not args.quiet)
    path = write_report(report, Path(args.json) if args.json else out / "composition.json")
    print("\n".join(summary_lines(report)))
    print(f"  report: {path}")
    return 0


def _compare_composition(reranker, args: argparse.Namespace, out: Path) -> int:
    """A re-ranker and its CLIP on the same ShapesWorld tests (the re-ranker carries the CLIP it was trained over;
    a captioner, scored by its captions' likelihood, is measured alone)."""
    from ..eval.composition import summary_lines
    from ..eval.report import write_report
    from ..eval.rerank import compare_composition, comparison_lines

    if args.data != "shapes":
        raise ValueError("a re-ranker is compared with its CLIP on ShapesWorld: leave --data at shapes")
    reports = compare_composition(reranker, n=args.n, split=args.split, out=out, progress=not args.quiet)
    path = write_report(reports, Path(args.json) if args.json else out / "composition_rerank.json")
    print("\n".join(summary_lines(reports["reranker"])))
    if "clip" in reports:
        print("\n".join(comparison_lines(reports)))
    print(f"  report: {path}")
    return 0


def _eval_generation(model, args: argparse.Namespace, out: Path) -> int:
    """A captioner (BLEU, CIDEr, attribute accuracy) or an answerer (VQA accuracy per question type)."""
    from ..interfaces import Answerer, Captioner

    if args.kind == "caption":
        from ..eval.captioning import evaluate_captioner, summary_lines

        if not isinstance(model, Captioner):
            raise ValueError(f"{args.model} does not caption images; `eval caption` needs a captioner")
        report = evaluate_captioner(model, args.data, n=args.n, out=out, split=args.split)
        name = "captioning"
    else:
        from ..eval.vqa import evaluate_answerer, summary_lines

        if not isinstance(model, Answerer):
            raise ValueError(f"{args.model} does not answer questions; `eval vqa` needs an answerer")
        report = evaluate_answerer(model, args.data, n=args.n, out=out, split=args.split)
        name = "vqa"
    if args.json:
        from ..eval.report import write_report

        write_report(report, Path(args.json))
    print("\n".join(summary_lines(report)))
    print(f"  report: {args.json or out / (name + '.json')}, plots in {out}")
    return 0


def _eval_fusion(model, args: argparse.Namespace, out: Path) -> int:
    """A fusion classifier on the held-out split it was trained beside, or on every example of --data FILE."""
    from ..data.features import load_feature_file
    from ..eval.classification import evaluate_fusion
    from ..train.fusion_task import rebuild_test_data

    if getattr(model, "family", None) != "fusion":
        raise ValueError(f"{args.model} is not a fusion classifier; `eval fusion` needs one (mmfusion train fusion)")
    if args.data and args.data != "shapes":
        data = load_feature_file(args.data)
        names = list(model.cfg.class_names)
        if names and data.class_names != names:
            raise ValueError(f"{args.data} has classes {data.class_names}, the model {names}: they must be the same")
        where = args.data
    else:
        trained_on = (getattr(model, "meta", None) or {}).get("trained_on")
        if not trained_on:
            raise ValueError(f"{args.model} does not record its data; give the examples with --data FILE.npz")
        data, where = rebuild_test_data(trained_on), "its held-out split"
    report = evaluate_fusion(model, data, out)
    m = report["metrics"]
    print(f"{model.cfg.strategy} fusion on {where} ({report['n']} examples): accuracy {m['accuracy']:.3f}, "
          f"macro-F1 {m['macro_f1']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}")  # fmt: skip
    for mod, mm in report["missing_modality"].items():
        print(f"  without {mod}: accuracy {mm['accuracy']:.3f}")
    print(f"  report: {out / 'fusion.json'}, {out / 'confusion.png'}")
    return 0


def add_parser(sub) -> None:
    e = command(
        sub,
        "eval",
        cmd_eval,
        help="measure a model",
        description="Evaluate a checkpoint; prints the metrics and "
        "writes a JSON report and PNG plots (default: RUN/eval/ for a training run directory).",
    )
    e.add_argument(
        "kind", choices=LazyChoices(_eval_kinds), metavar="KIND",
        help="which evaluation: %(choices)s (composition: true captions against hard negatives, per type; fusion: "
             "a fusion classifier on its held-out split, or on --data FILE.npz; caption: BLEU, CIDEr and attribute "
             "accuracy; vqa: accuracy per question type)",
    )  # fmt: skip
    add_model_options(e)
    e.add_argument(
        "--data",
        default="shapes",
        help="'shapes' (in memory) or a folder (captions.jsonl for "
        "retrieval and composition; class folders root/<class>/ for zero-shot)",
    )
    e.add_argument("--n", type=int, default=None, help="retrieval: images to rank (0 = all in a folder; default "
                   "1000); caption / vqa: images / questions; composition: scenes or images (default 500)")  # fmt: skip
    e.add_argument("--split", default="test", help="retrieval and composition on ShapesWorld: test or heldout")
    e.add_argument("--per-class", type=int, default=50, help="zero-shot on ShapesWorld: images per class")
    e.add_argument("--templates", help="zero-shot prompts: a file (one per line) or 'a photo of a {}.|a {}'")
    e.add_argument("--rerank", metavar="RUN", help="a re-ranker (mmfusion train rerank) or a captioner run "
                   "(scored by its captions' likelihood): composition scores with it (beside its CLIP, for a "
                   "cross-attention one); retrieval adds semantic P@1 with the top --rerank-k re-ranked")  # fmt: skip
    e.add_argument("--rerank-k", type=int, default=20, help="retrieval with --rerank: results re-ranked (default 20)")
    e.add_argument("--json", help="where to write the JSON report")
    e.add_argument("--out", help="folder for the report and plots")


# `mmfusion eval KIND` -> what runs it; the kinds a family is measured with are in its registry entry
RUNNERS = {
    "retrieval": _eval_embedding,
    "zeroshot": _eval_embedding,
    "all": _eval_embedding,
    "composition": _eval_composition,
    "fusion": _eval_fusion,
    "caption": _eval_generation,
    "vqa": _eval_generation,
}


def _eval_kinds() -> list[str]:
    """Every family's evaluations, in the registry's order (imported only when needed: it loads torch)."""
    from ..models.registry import FAMILIES

    return list(dict.fromkeys(k for spec in FAMILIES.values() for k in spec.eval_kinds))
