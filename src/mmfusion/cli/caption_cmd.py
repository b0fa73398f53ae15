"""``mmfusion caption``: describe images in words with a captioner (a run of ``mmfusion train caption``, or BLIP)."""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError
from ..interfaces import GenerationOptions
from .common import Skipped, add_model_options, command

EXAMPLES_CAPTION = """
examples:
  mmfusion caption photo.jpg --model runs/caption          # a captioner trained by mmfusion train caption
  mmfusion caption *.png --model runs/caption --beams 3 --max-new-tokens 20 --json
  mmfusion caption photo.jpg --model hf:Salesforce/blip-image-captioning-base
  mmfusion caption *.jpg --model hf:Salesforce/blip-image-captioning-base --beams 3 --json
  mmfusion caption photo.jpg --model hf:Salesforce/blip-image-captioning-base --prompt "a photograph of"
  mmfusion caption photo.jpg --model blip/ --sample --temperature 0.8 --top-p 0.9 --seed 0

Prints one line per image: PATH<TAB>CAPTION. Files that cannot be read as images are skipped with a
message on stderr (exit status 1); the others are still captioned. Greedy decoding (the default) and beam
search are deterministic; sampling is repeatable with --seed. mmfusion's own captioners (a caption or generative
VQA run) take every option but --prompt, which is BLIP's conditional captioning.
"""

_DEFAULTS = GenerationOptions()


def add_parser(sub) -> None:
    c = command(
        sub,
        "caption",
        cmd_caption,
        help="describe images in words (your captioner run, or BLIP)",
        description="Write a caption for each IMAGE with a captioner: a run of mmfusion train caption (or of "
        "mmfusion train vqa --preset caption-tiny), or a BLIP model such as "
        "hf:Salesforce/blip-image-captioning-base. With --prompt (BLIP only) every caption continues that text.",
        epilog=EXAMPLES_CAPTION,
    )
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_options(c)
    c.add_argument(
        "--prompt", metavar="TEXT", help="text every caption starts with (conditional captioning; BLIP models)"
    )
    c.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"most tokens to generate per caption (default {_DEFAULTS.max_new_tokens})",
    )
    c.add_argument("--beams", type=int, metavar="N", help="beam search with this many beams (default 1: greedy)")
    c.add_argument("--sample", action="store_true", help="sample instead of picking the likeliest token")
    c.add_argument("--temperature", type=float, metavar="T", help=f"with --sample (default {_DEFAULTS.temperature})")
    c.add_argument(
        "--top-p", type=float, metavar="P", help=f"with --sample: nucleus sampling (default {_DEFAULTS.top_p})"
    )
    c.add_argument("--seed", type=int, metavar="S", help="with --sample: makes the captions repeatable")
    c.add_argument(
        "--repetition-penalty", type=float, metavar="R", help="above 1 discourages repeated words (default 1.0)"
    )
    c.add_argument(
        "--batch-size", type=int, metavar="N", help="images per model call (default: the model's, 16 for BLIP)"
    )
    c.add_argument("--json", action="store_true", help='print a JSON list of {"image", "caption"}')


def caption_options(args: argparse.Namespace) -> dict:
    """The generation options the flags ask for (only those given), checked before any model is loaded."""
    sampling_only = {"--temperature": args.temperature, "--top-p": args.top_p, "--seed": args.seed}
    stray = [flag for flag, v in sampling_only.items() if v is not None]
    if stray and not args.sample:
        raise ConfigError(f"{', '.join(stray)} only apply to sampling; add --sample")
    named = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.beams,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
    }
    opts = {k: v for k, v in named.items() if v is not None}
    if args.sample:
        opts["do_sample"] = True
    GenerationOptions(**opts)  # ValueError now for --beams 0, --top-p 2...
    return opts


def _not_a_captioner(model) -> str:
    from ..interfaces import Answerer, Embedder, Transcriber

    kind = getattr(model, "model_type", None) or getattr(model, "family", None) or type(model).__name__
    name = getattr(model, "name", None) or "the model"
    what = next((i.__name__ for i in (Embedder, Answerer, Transcriber) if isinstance(model, i)), None)
    article = "an" if what and what[0] in "AEIOU" else "a"
    role = f" ({article} {what})" if what else ""
    return (f"{name} is a {kind.upper()} model{role}; caption needs a BLIP model (e.g. "
            "hf:Salesforce/blip-image-captioning-base) or a captioner trained by mmfusion train caption (e.g. "
            "runs/caption)")  # fmt: skip


def cmd_caption(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.images import ImageDecodeError, load_image
    from ..interfaces import Captioner
    from .common import load_model

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion caption --help")
    options = caption_options(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(args)
    if not isinstance(model, Captioner):
        raise ValueError(_not_a_captioner(model))
    if args.batch_size:
        model.batch_size = args.batch_size
    step = getattr(model, "batch_size", 16)
    results, skipped = [], Skipped("images", len(args.images))
    for i in range(0, len(args.images), step):
        paths, images = [], []
        for path in args.images[i : i + step]:
            try:
                images.append(load_image(path))
                paths.append(path)
            except ImageDecodeError as e:
                skipped.skip(path, e)
        if not images:
            continue
        captions = model.caption(images, prompt=args.prompt, **options)
        for path, text in zip(paths, captions, strict=True):
            if args.json:
                results.append({"image": path, "caption": text})
            else:
                print(f"{path}\t{text}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return skipped.exit_code()
