"""Speed of mmfusion's CLIP against Hugging Face transformers' CLIPModel, side by side in one run.

1. One training step (forward, symmetric InfoNCE, backward, AdamW) at identical geometry, batch and
   inputs, for the clip-tiny and ViT-B/32 geometries: samples/s of each and the ratio.
2. Image-encoding throughput of the ViT-B/32 geometry at batch 32, next to the machine's measured
   fp32 matmul peak, as model-FLOPs utilisation (FLOPs counted by torch's FlopCounterMode).

Both models get the same pixels and the same token ids, padded to the context length as CLIP's
tokenizers do, with <eot> ending each text. mmfusion's text tower computes only what the pooled
<eot> features depend on (it drops the columns after the batch's last <eot> and runs its last
block at the <eot> alone), so a third column times CLIPModel on ids padded only to the batch's
longest text (what ``padding=True`` gives in transformers), the fairest setting for it.

Run: python benchmarks/bench_clip_speed.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

import mmfusion
from mmfusion.modules.losses import clip_loss


def hf_clip(cfg, vocab: int):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    v, t = cfg.vision, cfg.text
    hf_cfg = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=t.width,
            intermediate_size=int(t.width * t.mlp_ratio),
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            hidden_act=t.act,
            eos_token_id=3,
            pad_token_id=0,
            bos_token_id=2,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=v.width,
            intermediate_size=int(v.width * v.mlp_ratio),
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.act,
        ),
        projection_dim=cfg.embed_dim,
    )
    return CLIPModel(hf_cfg)


def inputs(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.vision.image_size, cfg.text.context_length
    pixels = torch.randn(batch, 3, S, S, generator=g)
    tokens = torch.zeros(batch, L, dtype=torch.long)
    lengths = torch.randint(6, min(L - 1, 20), (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = 2
        tokens[i, 1:n] = torch.randint(4, 400, (n - 1,), generator=g)
        tokens[i, n] = 3
    return pixels, tokens, (tokens != 0).long()


def time_steps(step, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_comparison(preset: str, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    ours = mmfusion.create_model(preset).train()
    cfg = ours.cfg
    theirs = hf_clip(cfg, cfg.text.vocab_size).train()
    pixels, tokens, mask = inputs(cfg, batch)
    longest = int(mask.sum(dim=1).max())
    tokens_short, mask_short = tokens[:, :longest], mask[:, :longest]
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        out = ours(pixels, tokens)
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale).loss
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    def step_theirs():
        out = theirs(input_ids=tokens, pixel_values=pixels, attention_mask=mask, return_loss=True)
        opt_b.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_b.step()

    def step_theirs_short():
        out = theirs(input_ids=tokens_short, pixel_values=pixels, attention_mask=mask_short, return_loss=True)
        opt_b.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_b.step()

    # alternate so that machine noise hits all alike
    a, b, c = [], [], []
    for _ in range(2):
        a.append(time_steps(step_ours, 1, reps))
        b.append(time_steps(step_theirs, 1, reps))
        c.append(time_steps(step_theirs_short, 1, reps))
    ta, tb, tc = min(a), min(b), min(c)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    return {
        "preset": preset,
        "batch": batch,
        "params_mmfusion": n_ours,
        "params_transformers": n_theirs,
        "mmfusion_samples_per_s": batch / ta,
        "transformers_samples_per_s": batch / tb,
        "ratio": tb / ta,
        "transformers_longest_samples_per_s": batch / tc,
        "ratio_vs_longest": tc / ta,
    }


def matmul_peak(n: int = 2048, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time_steps(lambda: a @ b, 2, reps)
    return 2 * n**3 / t


def vit_mfu(batch: int, reps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model = mmfusion.create_model("vit-b-32").eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.encode_image(x)
        flops = counter.get_total_flops()
        t = time_steps(lambda: model.encode_image(x), 2, reps)
    peak = matmul_peak()
    achieved = flops / t
    return {
        "batch": batch,
        "images_per_s": batch / t,
        "gflops_per_image": flops / batch / 1e9,
        "achieved_gflops": achieved / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": achieved / peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, tiny geometry only")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    reps = 2 if args.quick else 5
    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "train_step": [],
    }
    configs = [("clip-tiny", 256)] if args.quick else [("clip-tiny", 256), ("vit-b-32", 32)]
    for preset, batch in configs:
        r = train_step_comparison(preset, batch, reps)
        results["train_step"].append(r)
        print(
            f"train step {preset:9s} batch {batch:3d}: mmfusion {r['mmfusion_samples_per_s']:7.1f} samples/s | "
            f"transformers CLIPModel {r['transformers_samples_per_s']:7.1f} samples/s (ratio {r['ratio']:.2f}x), "
            f"padded to the longest {r['transformers_longest_samples_per_s']:7.1f} samples/s "
            f"(ratio {r['ratio_vs_longest']:.2f}x)",
            flush=True,
        )
    if not args.quick:
        m = vit_mfu(32, reps)
        results["vit_b_32_encode"] = m
        print(
            f"ViT-B/32 image encoding, batch 32: {m['images_per_s']:.1f} images/s, {m['gflops_per_image']:.2f} "
            f"GFLOPs/image -> {m['achieved_gflops']:.0f} GFLOP/s of a measured {m['matmul_peak_gflops']:.0f} GFLOP/s "
            f"fp32 matmul peak: MFU {m['mfu']:.0%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
