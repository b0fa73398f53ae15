"""``mmfusion classify``: zero-shot labels (or concept flags) for images, with any Embedder."""

from __future__ import annotations

import argparse
import json

from .common import Skipped, add_model_options, command, load_model

EXAMPLES = """
examples:
  mmfusion classify photo.jpg --model hf:openai/clip-vit-base-patch32 --labels cat,dog,car
  mmfusion classify pics/*.jpg --model runs/clip --labels labels.txt -k 3 --json
  mmfusion classify pics/*.jpg --model hf:google/siglip-base-patch16-224 --labels concepts.txt --threshold 0.5
  mmfusion classify photo.jpg --model runs/clip --labels captions.txt --templates '{}'   # best caption

Labels: a file (one per line, # comments) or a comma-separated list. Each label is embedded through the
prompt ensemble (16 photo prompts unless --templates says otherwise) once per model and cached in
~/.cache/mmfusion/labels. With --threshold, every label scoring at least that is printed (concept
moderation): SigLIP-style models score each label with its own sigmoid, others by cosine similarity.
"""


def add_parser(sub) -> None:
    p = command(
        sub,
        "classify",
        cmd_classify,
        help="zero-shot labels for images (CLIP, SigLIP or a native model)",
        description="Rank the given labels for each image by how well the model matches them, with "
        "probabilities; or, with --threshold, list the labels found in each image.",
        epilog=EXAMPLES,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_options(p)
    p.add_argument("--labels", required=True, help="a file with one label per line, or 'cat,dog,car'")
    p.add_argument(
        "--templates",
        help="prompt templates with {}: a file (one per line) or 'a photo of a {}.|a {}' (default: 16 photo prompts)",
    )
    p.add_argument("-k", type=int, default=5, help="labels to show per image (default 5)")
    p.add_argument(
        "--threshold", type=float, help="list every label scoring at least this (sigmoid for SigLIP, else cosine)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the label-embedding cache")
    p.add_argument("--json", action="store_true", help="print JSON: one object per image")


def cmd_classify(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError
    from ..data.images import ImageDecodeError, load_image
    from ..interfaces import Embedder
    from ..tasks import ZeroShotClassifier
    from ..tasks.labels import DEFAULT_CACHE

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion classify --help")
    if args.k < 1:
        raise ValueError("-k must be at least 1")
    model = load_model(args)
    if not isinstance(model, Embedder):
        raise ValueError(
            f"{args.model} is a {type(model).__name__}; classify needs an Embedder: a CLIP or SigLIP model "
            "(hf:...) or a native CLIP checkpoint"
        )
    clf = ZeroShotClassifier(model, args.labels, args.templates, cache_dir=None if args.no_cache else DEFAULT_CACHE)
    skipped = Skipped("images", len(args.images))
    results = []
    for path in args.images:
        try:
            image = load_image(path)
        except (ImageDecodeError, OSError) as e:
            skipped.skip(path, e)
            continue
        preds = clf.flag([image], args.threshold)[0] if args.threshold is not None else clf.classify([image], args.k)[0]
        results.append((path, preds))
        if not args.json:
            shown = ", ".join(f"{p.label} {p.score:.3f}" for p in preds) or "(none above the threshold)"
            print(f"{path}\t{shown}", flush=True)
    if args.json:
        key = "flags" if args.threshold is not None else "labels"
        out = [
            {"image": p, key: [{"label": x.label, "score": round(x.score, 6)} for x in preds]} for p, preds in results
        ]
        print(json.dumps(out, indent=2, ensure_ascii=False))
    return skipped.exit_code()
