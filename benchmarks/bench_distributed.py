"""Training CLIP in several processes on one machine: throughput, the cost of the gather, and quality.

1. **Throughput** (``--part speed``): `mmfusion train clip` (the clip-tiny preset on the ShapesWorld stream, batch
   ``--batch``) as 1 process with all ``--cores`` threads against ``--cores`` processes (torchrun, gloo) with one
   thread each, alternating ``--repeats`` times; samples/s is the median over each run's steps after the first 5.
2. **Gather** (``--part gather``): in 2 processes, the global-batch CLIP loss (forward and backward, D 256) at
   global batches 64 to 2,048, with ``local_loss`` on and off, against the same loss on the process's own part
   only (what training without the gather would cost): ms per step, the median of 20.
3. **Quality** (``--part quality``): 1 process and ``--cores`` processes, each trained for the same wall-clock
   (``--time``) with ``--seeds`` seeds, then `mmfusion eval retrieval` on the ShapesWorld test split: R@10.

Run: python benchmarks/bench_distributed.py [--part speed gather quality] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def train(out: Path, nproc: int, cores: int, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmfusion", "-q", "train", "clip", "--out", str(out), "--train.progress=false",
           "--train.log_every=1", *extra]  # fmt: skip
    env = dict(os.environ)
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    else:
        cmd += [f"--train.threads={cores}"]
        env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done


def speed(args) -> dict:
    arms = {f"1 process x {args.cores} threads": 1, f"{args.cores} processes x 1 thread": args.cores}
    got: dict[str, list[float]] = {k: [] for k in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, n in arms.items():
                out = Path(tmp) / f"{n}-{r}"
                train(out, n, args.cores, ["--steps", str(args.steps), f"--train.batch_size={args.batch}"])
                rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                got[name].append(statistics.median(x["samples_per_s"] for x in rows[5:]))
                print(f"  {name}: {got[name][-1]:.1f} samples/s", flush=True)
    out = {k: round(statistics.median(v), 1) for k, v in got.items()}
    a, b = list(out.values())
    out["ratio"] = round(b / a, 3)
    return out


def _gather_worker(rank: int, world: int, port: int, result: str, sizes: list[int]) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from mmfusion.modules.global_losses import global_contrastive
    from mmfusion.modules.losses import clip_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    for B in sizes:
        part = B // world
        g = torch.Generator().manual_seed(rank)
        img = F.normalize(torch.randn(part, 256, generator=g), dim=1).requires_grad_()
        txt = F.normalize(torch.randn(part, 256, generator=g), dim=1).requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        arms = {
            "own part only": lambda i=img, t=txt, s=scale: clip_loss(i, t, s).loss,
            "global, local_loss": lambda i=img, t=txt, s=scale: global_contrastive("clip", i, t, s)[0].loss,
            "global, whole loss": lambda i=img, t=txt, s=scale: global_contrastive(
                "clip", i, t, s, local_loss=False)[0].loss,
        }  # fmt: skip
        row = {"global_batch": B}
        for name, fn in arms.items():
            times = []
            for _ in range(25):
                dist.barrier()
                t0 = time.perf_counter()
                fn().backward()
                times.append(time.perf_counter() - t0)
            row[name] = round(statistics.median(times[5:]) * 1000, 2)
        rows.append(row)
    if rank == 0:
        Path(result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def gather(args) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "gather.json")
        mp.spawn(_gather_worker, args=(2, port, result, [64, 256, 1024, 2048]), nprocs=2, join=True)
        return json.loads(Path(result).read_text())


def retrieval(run: Path) -> dict[str, float]:
    """Image-to-text and text-to-image R@10 and semantic P@1 on the ShapesWorld test split."""
    done = subprocess.run([sys.executable, "-m", "mmfusion", "-q", "eval", "retrieval", "--model", str(run),
                           "--json", str(run / "r.json")], capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    m = json.loads((run / "r.json").read_text())["metrics"]
    return {k: round(m[k], 4) for k in ("i2t_R@10", "t2i_R@10", "semantic_P@1")}


def quality(args) -> dict:
    arms = (("1 process", 1), (f"{args.cores} processes", args.cores))
    out: dict[str, list[dict]] = {name: [] for name, _ in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name, n in arms:
                run = Path(tmp) / f"{n}-{seed}"
                train(run, n, args.cores, ["--time", args.time, f"--train.seed={seed}"])
                out[name].append(retrieval(run))
                print(f"  seed {seed}, {name}: {out[name][-1]}", flush=True)
    return {name: {"runs": runs, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
            for name, runs in out.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["speed", "gather", "quality"])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--time", default="2m")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    report = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}
    for part in args.part:
        print(f"{part}:", flush=True)
        report[part] = {"speed": speed, "gather": gather, "quality": quality}[part](args)
        print(json.dumps(report[part], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
