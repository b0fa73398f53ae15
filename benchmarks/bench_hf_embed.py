"""Embedding throughput of a pretrained CLIP through mmfusion's adapter vs calling transformers directly.

The CLIP ViT-B/32 geometry (transformers' default ``CLIPConfig``) with random weights, saved once with
its processor to ``runs/bench-hf/clip-b32`` and loaded the way a user loads a downloaded model. Four
ways side by side in one run, alternating, median of repeats:

* transformers directly: ``processor(images)`` then ``model.get_image_features``; tokenizer then
  ``get_text_features``; normalised by hand;
* mmfusion: ``mmfusion.load(dir).encode_image(images)`` / ``encode_text(texts)``;
* the same two with dynamic int8 quantisation of the linear layers (CPU), and the cosine agreement of
  int8 embeddings with fp32 ones.

Images are 640x480 photos (the processor resizes and crops them to 224); texts are ShapesWorld captions.
On a CUDA machine pass ``--device cuda`` (fp32 and fp16/bf16 instead of int8).

Run: python benchmarks/bench_hf_embed.py [--batch 32] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import mmfusion
from mmfusion.backends.hf import quantize_int8


def make_model(path: Path) -> Path:
    """Save a random ViT-B/32 CLIP and a word-level tokenizer over ShapesWorld's vocabulary."""
    if (path / "config.json").is_file():
        return path
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mmfusion.data.shapes import ShapesWorld

    words = sorted({w for t in ShapesWorld.vocabulary_texts() for w in t.lower().replace(".", " ").split()})
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "<|startoftext|>"] + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", model_max_length=77,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = CLIPConfig()
    cfg.text_config.bos_token_id, cfg.text_config.eos_token_id, cfg.text_config.pad_token_id = 2, 0, 0
    CLIPModel(cfg).eval().save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


def timed(fn, n_items: int, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(n_items / (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="images and texts per call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="runs/bench-hf/clip-b32")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from transformers import AutoProcessor, CLIPModel

    from mmfusion.data.shapes import ShapesWorld

    path = make_model(Path(args.dir))
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BILINEAR)
        for _ in range(args.batch)
    ]
    world = ShapesWorld()
    texts = [world.captions(world.scene("test", i))[0].text for i in range(args.batch)]

    # transformers, called directly
    proc = AutoProcessor.from_pretrained(path)
    low = {"cpu": torch.float32}.get(dev.type, torch.bfloat16)
    direct = {"fp32": CLIPModel.from_pretrained(path).eval().to(dev)}
    if dev.type == "cpu":
        direct["int8"] = quantize_int8(CLIPModel.from_pretrained(path).eval())
    else:
        direct["bf16"] = CLIPModel.from_pretrained(path, dtype=low).eval().to(dev)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def direct_images(m, dtype):
        with torch.inference_mode():
            pix = proc.image_processor(images=images, return_tensors="pt")["pixel_values"].to(dev, dtype)
            return F.normalize(feats(m.get_image_features(pixel_values=pix)).float(), dim=-1).cpu()

    def direct_texts(m):
        with torch.inference_mode():
            tok = proc.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(dev)
            return F.normalize(feats(m.get_text_features(**tok)).float(), dim=-1).cpu()

    # mmfusion's adapter, loaded by name
    ours = {"fp32": mmfusion.load(str(path), device=args.device, dtype="fp32")}
    if dev.type == "cpu":
        ours["int8"] = mmfusion.load(str(path), device="cpu", quantize="int8")
    else:
        ours["bf16"] = mmfusion.load(str(path), device=args.device, dtype="bf16")
    for e in ours.values():
        e.batch_size = args.batch

    results: dict[str, dict] = {}
    for prec in ours:
        dt = torch.float32 if prec in ("fp32", "int8") else low
        runs = {
            "images: transformers": lambda p=prec, d=dt: direct_images(direct[p], d),
            "images: mmfusion": lambda p=prec: ours[p].encode_image(images),
            "texts: transformers": lambda p=prec: direct_texts(direct[p]),
            "texts: mmfusion": lambda p=prec: ours[p].encode_text(texts),
        }
        for fn in runs.values():
            fn()  # warm-up
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):  # alternate, so drift in the machine's speed hits all alike
            for k, fn in runs.items():
                rates[k] += timed(fn, args.batch, 1)
        med = {k: statistics.median(v) for k, v in rates.items()}
        results[prec] = {
            k: round(v, 2) for k, v in med.items()
        } | {
            "image overhead": round(1 - med["images: mmfusion"] / med["images: transformers"], 4),
            "text overhead": round(1 - med["texts: mmfusion"] / med["texts: transformers"], 4),
        }  # fmt: skip
        print(f"{prec}: " + ", ".join(f"{k} {v}" for k, v in results[prec].items()), flush=True)
    # agreement of the low-precision embeddings with fp32, and of the adapter with transformers
    low_key = "int8" if dev.type == "cpu" else "bf16"
    z32i, z32t = ours["fp32"].encode_image(images), ours["fp32"].encode_text(texts)
    cos_i = (ours[low_key].encode_image(images) * z32i).sum(-1)
    cos_t = (ours[low_key].encode_text(texts) * z32t).sum(-1)
    results["agreement"] = {
        f"{low_key} vs fp32 image cosine (min, mean)": [round(float(cos_i.min()), 5), round(float(cos_i.mean()), 5)],
        f"{low_key} vs fp32 text cosine (min, mean)": [round(float(cos_t.min()), 5), round(float(cos_t.mean()), 5)],
        "adapter vs transformers, max abs difference": float(
            max(
                (z32i - direct_images(direct["fp32"], torch.float32)).abs().max(),
                (z32t - direct_texts(direct["fp32"])).abs().max(),
            )
        ),  # fmt: skip
        f"{low_key} speed-up over fp32 (images, texts)": [
            round(results[low_key]["images: mmfusion"] / results["fp32"]["images: mmfusion"], 3),
            round(results[low_key]["texts: mmfusion"] / results["fp32"]["texts: mmfusion"], 3),
        ],
    }
    print(json.dumps(results["agreement"], indent=1))
    if args.json:
        meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "device": str(dev), "batch": args.batch, "repeats": args.repeats}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta | {"results": results}, indent=2))


if __name__ == "__main__":
    main()
