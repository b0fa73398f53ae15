"""``mmfusion embed``: embed folders of images into Parquet shards, in this process or on a Ray cluster."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..config import ConfigError
from .common import add_decode_options, add_ray_options, command, positive_int, ray_options

EXAMPLES = """
examples:
  mmfusion embed ~/Pictures --model runs/clip --out emb/            # in this process
  mmfusion embed /data/coco --model runs/clip --out emb/ --ray      # on a Ray started on this machine
  mmfusion embed /mnt/shared/laion --model hf:openai/clip-vit-base-patch32 --out /mnt/shared/emb \\
      --ray auto --actors 16 --gpus-per-actor 1                     # on the cluster 'ray start' runs
  mmfusion index --from-embeddings emb/ --db photos                 # then index them (no model needed)

Each shard (shard-00000.parquet, ...) holds --shard-size files: path, root, size, mtime_ns, hash, vector,
width, height, format, taken and error (set for a file that could not be read). A shard is written whole
when its files are done: a killed run keeps its finished shards, and running the same command again
embeds only the files no shard holds at their current size and mtime.
"""


def add_parser(sub) -> None:
    p = command(
        sub,
        "embed",
        cmd_embed,
        help="embed folders of images into Parquet shards (resumable; Ray for big collections)",
        description="Embed the images under PATH(s) with --model and write the vectors as Parquet shards in --out, "
        "for 'mmfusion index --from-embeddings' or any tool that reads Parquet.",
        epilog=EXAMPLES,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="folders or files to embed")
    p.add_argument("--out", required=True, help="the shard directory (created; resumed when it exists)")
    p.add_argument(
        "--model",
        required=True,
        help="a native checkpoint or training run directory, hf:<hub-id> or a save_pretrained directory",
    )
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="files per shard (default 10,000)")
    add_decode_options(p)
    p.add_argument("--json", action="store_true", help="print the run's report as JSON")
    add_ray_options(p)


def cmd_embed(args: argparse.Namespace, extra: list[str]) -> int:
    from ..index import QueryEncoder
    from ..index.collection import load_embedder, model_identity, model_ref
    from ..index.shards import embed_to_shards

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion embed --help")
    ray = ray_options(args)
    model = load_embedder(args.model)
    report = embed_to_shards(
        args.paths,
        args.out,
        QueryEncoder(model),
        model_identity(model, model_ref(args.model)),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        draft=not args.full_decode,
        max_pixels=args.max_pixels,
        ray=ray,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print("\n".join(report.summary()))
    return 0
