"""``mmfusion ask``: ask a question about an image (visual question answering)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import ConfigError
from .common import add_model_options, command, load_model

EXAMPLES_ASK = """
examples:
  mmfusion ask scene.png "What colour is the circle?" --model runs/vqa    # a run of mmfusion train vqa
  mmfusion ask photo.jpg "How many dogs are there?" --model hf:Qwen/Qwen2.5-VL-3B-Instruct
  mmfusion ask photo.jpg "Describe the scene." --model hf:Qwen/Qwen2.5-VL-3B-Instruct --max-new-tokens 200
  mmfusion ask photo.jpg "Write a caption." --model hf:Qwen/Qwen2.5-VL-3B-Instruct --temperature 0.7 --seed 1
  mmfusion ask receipt.png "What is the total?" --model ./qwen-vl-dir --system "Answer with a number." --json

The answer is printed as it is generated (--no-stream: all at once). Greedy decoding unless --temperature
or --top-p is given; --seed makes sampling repeatable. HF_HUB_OFFLINE=1 keeps everything off the network.
mmfusion's own VQA runs answer the question alone (no --system): one trained with --preset caption-tiny generates
its answer and takes the generation options; a VQA classifier (the default preset, vqa-tiny) picks one of the
answers it was trained on, so it refuses the generation options.
"""


def add_parser(sub) -> None:
    a = command(
        sub,
        "ask",
        cmd_ask,
        help="ask a question about an image (visual question answering)",
        description="Answer a question about an image with a VQA run of mmfusion train vqa (a classifier, or a "
        "captioner trained on questions with --preset caption-tiny) or a chat model such as "
        "hf:Qwen/Qwen2.5-VL-3B-Instruct.",
        epilog=EXAMPLES_ASK,
    )
    a.add_argument("image", metavar="IMAGE", help="the image file")
    a.add_argument("question", metavar="QUESTION", help="the question")
    add_model_options(a)
    a.add_argument("--system", help="a system prompt (instructions for how to answer; chat models such as Qwen)")
    a.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default 128)")
    a.add_argument("--temperature", type=float, help="sample at this temperature (0: greedy, the default)")
    a.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this total probability")
    a.add_argument("--seed", type=int, help="random seed: the same seed gives the same sampled answer")
    a.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeating tokens (default 1)")
    a.add_argument("--num-beams", type=int, help="beam search with this many beams (the answer comes at once)")
    a.add_argument(
        "--max-pixels", type=int, help="resize images to at most this many pixels (default 1003520: 1280 tokens)"
    )
    a.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    a.add_argument("--json", action="store_true", help="print model, image, question and answer as JSON")


def generation_options(args: argparse.Namespace) -> dict:
    """The generation options the flags ask for (only those given; sampling when a temperature or top-p is)."""
    names = ("max_new_tokens", "repetition_penalty", "num_beams", "seed", "temperature", "top_p")
    opts: dict = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if (args.temperature is not None and args.temperature > 0) or args.top_p is not None:
        opts["do_sample"] = True
    return opts


ANSWERERS = (
    "a run of mmfusion train vqa (a classifier, or a captioner trained on questions with --preset caption-tiny) "
    "or a chat model such as hf:Qwen/Qwen2.5-VL-3B-Instruct"
)


def _kind(model) -> str:
    from ..interfaces import Captioner, Embedder, Transcriber

    for proto, what in ((Embedder, "an image-text embedder"), (Captioner, "a captioner"),
                        (Transcriber, "a speech transcriber")):  # fmt: skip
        if isinstance(model, proto):
            return what
    return f"a {type(model).__name__}"


def cmd_ask(args: argparse.Namespace, extra: list[str]) -> int:
    from ..backends.hf import as_pil_images
    from ..data.images import ImageDecodeError
    from ..interfaces import Answerer, GenerationOptions

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion ask --help")
    opts = generation_options(args)
    GenerationOptions(**opts)  # bad values fail before the model loads
    try:
        image = as_pil_images(args.image)[0]
    except ImageDecodeError as e:
        raise ValueError(f"{args.image}: {e}") from e
    model = load_model(args)
    if not isinstance(model, Answerer):
        raise ValueError(
            f"{args.model} is {_kind(model)}, not a model that answers questions about images; mmfusion ask needs "
            f"one: {ANSWERERS}"
        )
    if not getattr(model, "answers_questions", True):
        raise ValueError(f"{args.model} is a captioner trained on captions only; mmfusion ask needs {ANSWERERS}")
    vocabulary = getattr(model, "answer_vocabulary", None)
    if vocabulary is not None and opts:
        flags = ", ".join("--" + k.replace("_", "-") for k in opts if k != "do_sample")
        raise ValueError(f"{args.model} is a VQA classifier: it picks one of its {len(vocabulary)} answers rather "
                         f"than generating, so {flags} do not apply; leave them out")  # fmt: skip
    if args.max_pixels is not None:
        if not hasattr(model, "max_pixels"):
            raise ValueError(f"{args.model} does not take --max-pixels")
        model.max_pixels = args.max_pixels
    if args.system is not None:
        opts_call = {**opts, "system": args.system}
    else:
        opts_call = opts
    start = time.perf_counter()
    if args.json or args.no_stream:
        answer = model.answer([image], args.question, **opts_call)[0]
        if not args.json:
            print(answer)
    else:
        pieces = []
        stream = model.stream_answer(image, args.question, **opts_call)
        try:
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:  # Ctrl-C: stop generating now
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        answer = "".join(pieces)
    if args.json:
        record = {
            "model": getattr(model, "name", args.model),
            "image": args.image,
            "question": args.question,
            "system": args.system,
            "answer": answer,
            "options": opts,
            "seconds": round(time.perf_counter() - start, 3),
        }
        print(json.dumps(record, ensure_ascii=False, indent=2))
    return 0
