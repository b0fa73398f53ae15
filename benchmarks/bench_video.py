"""Video on ShapesWorld actions: TimeSformer against its baselines, what divided attention costs, what batching saves.

1. Quality: divided (TimeSformer), joint space-time attention and frame pooling, each trained for the same
   number of steps on the same ShapesWorld action stream (video-tiny geometry: 8 frames of 32 px; a step
   budget, not a time budget, so that the machine's other load does not change what each model sees), then
   top-1, top-5 and per-class accuracy on the same held-out clips, with the wall time each took. Accuracy
   on the four direction classes (left/right/up/down) is reported apart: a left clip played backwards is a
   right clip, so only a model that reads frame order can beat 1/2 on them (1/4 without even the axis).
2. Cost: forward FLOPs per clip of divided and joint attention (counted from the shapes, checked against
   torch's FlopCounterMode with attention run as plain matmuls) and wall time per clip, inference and a
   training step, side by side, at 32 and 64 px.
3. Batching: the batched divided-attention encoder against its frame-by-frame loop reference on the same
   input and weights (outputs compared), at 32 and 64 px.

Run: python benchmarks/bench_video.py [--steps 600] [--seeds 0 1 2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmfusion.modules.video import VideoEncoderConfig, build_video_encoder, count_flops
from mmfusion.train import RunConfig, TrainConfig, train
from mmfusion.train.config import VideoDataConfig

ATTENTIONS = ("divided", "joint", "pool")


def quality(attention: str, steps: int, seed: int, test_size: int, out: str) -> dict:
    cfg = RunConfig(
        task="video",
        preset="video-tiny",
        model={"encoder": {"attention": attention}},
        train=TrainConfig(
            steps=steps, batch_size=32, lr=1e-3, warmup_steps=30, seed=seed, progress=False, save_every=100_000
        ),
        video=VideoDataConfig(test_size=test_size),
        out=out,
    )
    result = train(cfg)
    r = result.report
    return {"attention": attention, "seed": seed, "steps": result.steps, "seconds": round(result.elapsed_s, 1),
            **{k: r["metrics"][k] for k in ("top1", "top5", "direction_accuracy", "macro_f1")},
            "per_class": r["per_class_accuracy"]}  # fmt: skip


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, reps: int, rounds: int = 3) -> dict[str, float]:
    """The best of ``rounds`` medians of each function, measured in turns so that machine noise hits all alike."""
    best: dict[str, float] = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], median_time(fn, reps))
    return best


def counted_flops(enc, clips: torch.Tensor) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        enc(clips)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() - counts.get("aten.convolution", 0)


def cost(image_size: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    clips = torch.randn(batch, 8, 3, image_size, image_size)
    row: dict = {"image_size": image_size, "frames": 8, "patches_per_frame": (image_size // 8) ** 2, "batch": batch}
    encoders = {}
    for attention in ("divided", "joint"):
        cfg = VideoEncoderConfig(attention=attention, image_size=image_size)
        enc = build_video_encoder(cfg)
        encoders[attention] = enc
        flops = count_flops(cfg)
        assert counted_flops(enc.eval(), clips[:1]) == sum(flops.values()), "analytic count != FlopCounterMode"
        row[f"{attention}_gflops_per_clip"] = sum(flops.values()) / 1e9
        row[f"{attention}_attention_gflops"] = flops["attention"] / 1e9

    def forward(enc):
        def run():
            with torch.no_grad():
                enc.eval()(clips)

        return run

    def step(enc):
        def run():
            enc.train()
            enc.zero_grad(set_to_none=True)
            enc(clips).square().mean().backward()

        return run

    t = interleaved({f"{a}_forward": forward(e) for a, e in encoders.items()} | {f"{a}_train": step(e)
                    for a, e in encoders.items()}, reps)  # fmt: skip
    for k, v in t.items():
        row[f"{k}_ms_per_clip"] = 1000 * v / batch
    row["joint_over_divided_flops"] = row["joint_gflops_per_clip"] / row["divided_gflops_per_clip"]
    row["joint_over_divided_forward_time"] = t["joint_forward"] / t["divided_forward"]
    row["joint_over_divided_train_time"] = t["joint_train"] / t["divided_train"]
    return row


def batching(image_size: int, batch: int, reps: int, device: str = "cpu", patch: int = 8, width: int = 96,
             heads: int = 4, layers: int = 4) -> dict:  # fmt: skip
    torch.manual_seed(0)
    cfg = VideoEncoderConfig(attention="divided", image_size=image_size, patch_size=patch, width=width, heads=heads,
                             layers=layers)  # fmt: skip
    enc = build_video_encoder(cfg).eval().to(device)
    clips = torch.randn(batch, 8, 3, image_size, image_size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(reference: bool):
        def go():
            enc.forward_features(clips, reference=reference)
            sync()

        return go

    with torch.no_grad():
        diff = float((enc.forward_features(clips) - enc.forward_features(clips, reference=True)).abs().max())
        t = interleaved({"batched": run(False), "loop": run(True)}, reps)
    return {"device": device, "image_size": image_size, "patch_size": patch, "width": width, "layers": layers,
            "batch": batch, "patches_per_frame": (image_size // patch) ** 2, "batched_ms": 1000 * t["batched"],
            "loop_ms": 1000 * t["loop"], "speedup": t["loop"] / t["batched"], "max_abs_difference": diff}  # fmt: skip


# (image_size, batch, patch, width, heads, layers): video-tiny at 32 and 64 px, one clip and a batch, and the
# geometry of the TimeSformer paper's base model (224 px, 16 px patches, width 768, 12 layers), cut to 2 layers
BATCHING_ROWS = [(32, 1, 8, 96, 4, 4), (32, 32, 8, 96, 4, 4), (64, 1, 8, 96, 4, 4), (64, 8, 8, 96, 4, 4),
                 (224, 1, 16, 768, 12, 2), (224, 8, 16, 768, 12, 2)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps of 32 clips for each model (default 600)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    ap.add_argument("--test-size", type=int, default=1000, help="held-out clips (default 1000)")
    ap.add_argument("--quick", action="store_true", help="30 steps and fewer repetitions (a smoke run)")
    ap.add_argument("--skip-quality", action="store_true", help="only the cost and batching measurements")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cpu", help="where the batching comparison runs (cpu, cuda)")
    ap.add_argument("--only-batching", action="store_true", help="only batched vs loop (e.g. with --device cuda)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    reps = 3 if args.quick else 7
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    results: dict = {"date": date.today().isoformat(), "torch": torch.__version__, "machine": machine}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
        results["machine"] += f", {results['gpu']}"
    print(results["machine"], flush=True)
    results["batching"] = []
    for size, batch, patch, width, heads, layers in BATCHING_ROWS:
        r = batching(size, batch, reps, args.device, patch, width, heads, layers)
        results["batching"].append(r)
        print(f"divided attention on {args.device}, {size} px ({r['patches_per_frame']} patches x 8 frames), width "
              f"{width}, {layers} layers, batch {batch}: batched {r['batched_ms']:.1f} ms, frame-by-frame loop "
              f"{r['loop_ms']:.1f} ms -> {r['speedup']:.1f}x (outputs differ by at most "
              f"{r['max_abs_difference']:.1e})", flush=True)  # fmt: skip
    if args.only_batching:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    results["cost"] = []
    for size, batch in ((32, 32), (64, 8)):
        r = cost(size, batch, reps)
        results["cost"].append(r)
        print(f"{size} px, 8 frames: GFLOPs/clip divided {r['divided_gflops_per_clip']:.3f} vs joint "
              f"{r['joint_gflops_per_clip']:.3f} ({r['joint_over_divided_flops']:.2f}x; attention "
              f"{r['divided_attention_gflops']:.3f} vs {r['joint_attention_gflops']:.3f}); ms/clip forward "
              f"{r['divided_forward_ms_per_clip']:.2f} vs {r['joint_forward_ms_per_clip']:.2f} "
              f"({r['joint_over_divided_forward_time']:.2f}x), train step {r['divided_train_ms_per_clip']:.2f} vs "
              f"{r['joint_train_ms_per_clip']:.2f} ({r['joint_over_divided_train_time']:.2f}x)",
              flush=True)  # fmt: skip
    if not args.skip_quality:
        results["quality"] = []
        steps = 30 if args.quick else args.steps
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                for attention in ATTENTIONS:
                    r = quality(attention, steps, seed, args.test_size, f"{tmp}/{attention}-{seed}")
                    results["quality"].append(r)
                    print(f"{attention:8s} seed {seed}: {r['steps']} steps in {r['seconds']:.0f}s -> top-1 "
                          f"{r['top1']:.3f}, top-5 {r['top5']:.3f}, directions {r['direction_accuracy']:.3f} | "
                          + " ".join(f"{c} {a:.2f}" for c, a in r["per_class"].items()), flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
