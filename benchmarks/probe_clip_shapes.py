"""What a trained CLIP's image embeddings know about the objects of a ShapesWorld scene.

Two probes, by number of objects in the scene:

1. Linear probes: a logistic regression per attribute (6 shapes, 8 colours; multi-label: which are
   present) trained on the frozen image embeddings of 6,000 training scenes, scored on 1,000 test scenes
   as the fraction whose whole set is right. It says whether the embedding carries each object's shape
   and colour at all, whatever the text tower does.
2. Shape pairs: for each two-object test scene, the 36 captions "a <colour 1> <shape> and a <colour 2>
   <shape>" with the scene's own colours and every pair of shapes; top-1 is the fraction where the
   image's best caption names both shapes right.

Run: python benchmarks/probe_clip_shapes.py --model runs/clip [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import mmfusion
from mmfusion.data.shapes import COLOURS, SHAPES, ShapesWorld, a_or_an
from mmfusion.eval.retrieval import embed_images, embed_texts


def scenes_and_labels(model, world: ShapesWorld, split: str, indices: range):
    scenes = [world.scene(split, i) for i in indices]
    emb = embed_images(model, [world.render(s) for s in scenes], progress=False)
    shapes = torch.tensor([[any(o.shape == v for o in s.objects) for v in SHAPES] for s in scenes]).float()
    colours = torch.tensor([[any(o.colour == v for o in s.objects) for v in COLOURS] for s in scenes]).float()
    return scenes, emb, {"shape": shapes, "colour": colours}


def linear_probe(x_train, y_train, x_test, steps: int = 1500) -> torch.Tensor:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x_train.shape[1], y_train.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(lin(10 * x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return lin(10 * x_test) > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained CLIP checkpoint directory")
    ap.add_argument("--train", type=int, default=6000, help="training scenes for the linear probes")
    ap.add_argument("--test", type=int, default=1000, help="test scenes")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = mmfusion.load(args.model)
    world = ShapesWorld()
    # training scenes from past the single-object curriculum, where the mix has 1-3 objects
    _, x_train, y_train = scenes_and_labels(model, world, "train", range(100_000, 100_000 + args.train))
    test, x_test, y_test = scenes_and_labels(model, world, "test", range(args.test))
    counts = torch.tensor([len(s.objects) for s in test])
    result: dict = {"model": args.model, "linear_probe_exact_set": {}}
    for attr in ("shape", "colour"):
        right = (linear_probe(x_train, y_train[attr], x_test) == y_test[attr].bool()).all(dim=1).float()
        result["linear_probe_exact_set"][attr] = {
            f"{n} objects": round(float(right[counts == n].mean()), 3) for n in (1, 2, 3) if (counts == n).any()
        }
        print(f"linear probe, {attr} set right:", result["linear_probe_exact_set"][attr])
    hits = total = 0
    for s in test:
        if len(s.objects) != 2:
            continue
        a, b = s.objects
        pairs = [(x, y) for x in SHAPES for y in SHAPES]
        texts = [f"{a_or_an(a.colour)} {a.colour} {x} and {a_or_an(b.colour)} {b.colour} {y}" for x, y in pairs]
        best = (embed_images(model, [world.render(s)], progress=False) @ embed_texts(model, texts).t()).argmax()
        hits += pairs[int(best)] == (a.shape, b.shape)
        total += 1
    result["shape_pairs_top1"] = round(hits / max(total, 1), 3)
    print(f"two-object scenes, best of 36 shape-pair captions right: {result['shape_pairs_top1']} (n={total})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
