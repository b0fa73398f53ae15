"""Caption generation with and without the decoder's key-value cache: time per caption, outputs compared.

The caption-tiny captioner (random weights: speed does not depend on what was learned) generates 32-token
captions for a batch of images (``<eot>`` is never accepted, so every caption is exactly 32 tokens and both
paths do the same number of steps). Both paths run side by side, alternating, ``--repeats`` times; the median
of each is reported with the ratio, and the generated token ids are checked to be identical.

Run: python benchmarks/bench_caption_cache.py [--batch 1 16] [--tokens 32] [--beams 1 4] [--decoder 512 6 8]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from mmfusion.data.tokenizer import PAD_ID, SOT_ID
from mmfusion.models import create_model
from mmfusion.modules.generation import generate


def run(model, images: torch.Tensor, tokens: int, beams: int, use_cache: bool) -> tuple[float, list]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        memory = model.image_tokens(images)
        ids = generate(model.decoder, memory, sot_id=SOT_ID, eot_id=-1, pad_id=PAD_ID, max_new_tokens=tokens,
                       num_beams=beams, use_cache=use_cache)  # fmt: skip
    return time.perf_counter() - t0, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="caption-tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--decoder", nargs=3, type=int, metavar=("WIDTH", "LAYERS", "HEADS"),
                    help="a decoder geometry other than the preset's, e.g. 512 6 8 (base-sized)")  # fmt: skip
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = {"context_length": max(args.tokens + 1, 32)}
    if args.decoder:
        decoder |= dict(zip(("width", "layers", "heads"), args.decoder, strict=True))
    model = create_model(args.preset, decoder=decoder).eval()
    geometry = {k: getattr(model.cfg.decoder, k) for k in ("width", "layers", "heads")}
    print(f"{args.preset}, decoder {geometry}")
    size = model.cfg.vision.image_size
    rows = []
    for batch in args.batch:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        for beams in args.beams:
            run(model, images, 4, beams, True), run(model, images, 4, beams, False)  # warm-up
            cached, plain, same = [], [], True
            for _ in range(args.repeats):
                t_c, ids_c = run(model, images, args.tokens, beams, True)
                t_p, ids_p = run(model, images, args.tokens, beams, False)
                cached.append(t_c)
                plain.append(t_p)
                same &= ids_c == ids_p
            c, p = statistics.median(cached), statistics.median(plain)
            rows.append({"batch": batch, "beams": beams, "tokens": args.tokens, "cache_ms_per_caption": 1e3 * c / batch,
                         "no_cache_ms_per_caption": 1e3 * p / batch, "speedup": p / c, "identical": same})  # fmt: skip
            print(f"batch {batch:3d}, beams {beams}: with cache {1e3 * c / batch:7.2f} ms/caption, without "
                  f"{1e3 * p / batch:7.2f} ms/caption, {p / c:4.1f}x faster, outputs identical: {same}")  # fmt: skip
    result = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads", "torch": torch.__version__, "preset": args.preset,
              "decoder": geometry, "rows": rows}  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
