"""The demo end to end: how long a fresh `mmfusion demo` takes, and how well its own captioner and VQA model do
through the running service's HTTP routes.

    python benchmarks/bench_demo.py --out runs/bench-demo --json runs/bench-demo.json       # fresh demo, ~10 min
    python benchmarks/bench_demo.py --out runs/bench-demo --reuse                           # the HTTP part only

1. `mmfusion demo --no-serve` in a fresh directory (timed: the whole demo, data to index).
2. `mmfusion serve --db OUT/index --captioner OUT/caption --answerer OUT/vqa` as its own process on a free
   loopback port (timed until /healthz answers).
3. For ``--scenes`` ShapesWorld test scenes beyond the gallery and the offline evaluation (never trained on, never
   indexed): each image captioned through POST /v1/chat/completions (image_url data URL, the captioner named) and
   every question of the scene asked through the same route (the answerer named). Caption attribute accuracy (every
   object's colour and shape named, nothing else) and VQA accuracy (exact match after VQA normalisation), beside the
   same models called in this process on the same scenes, and the demo's own offline reports.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mmfusion.data.shapes import ShapesWorld
from mmfusion.eval.captioning import check_caption
from mmfusion.eval.vqa import normalize_answer

OFFSET = 5000  # test scenes from here on: past the gallery (1000) and the offline evaluation (first 200/400)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(client: httpx.Client, model: str, image, question: str | None) -> str:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if question is not None:
        content.append({"type": "text", "text": question})
    r = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def run_demo(out: Path, budget: str) -> float:
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "-q", "demo", "--out", str(out), "--time", budget, "--no-serve"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def start_service(out: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "serve", "--db", str(out / "index"), "--port", str(port),
           "--captioner", str(out / "caption"), "--answerer", str(out / "vqa")]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"the service did not start: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the service did not answer /healthz within 120 s")


def measure(url: str, out: Path, scenes: int) -> dict:
    from mmfusion import load

    world = ShapesWorld()
    samples = [world.sample("test", OFFSET + i) for i in range(scenes)]
    captioner, answerer = load(out / "caption"), load(out / "vqa")
    http_caps, local_caps, http_ans, local_ans, truth, types = [], [], [], [], [], []
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as client:
        models = {m["role"]: m["id"] for m in client.get("/v1/models").json()["data"]}
        for s in samples:
            http_caps.append(chat(client, models["captioner"], s.image, None))
            for qa in s.questions:
                http_ans.append(chat(client, models["answerer"], s.image, qa.question))
                truth.append(qa.answer)
                types.append(qa.type)
    http_s = time.perf_counter() - t0
    for s in samples:
        local_caps += captioner.caption([s.image])
        local_ans += answerer.answer([s.image] * len(s.questions), [qa.question for qa in s.questions])

    def caption_acc(caps):
        return sum(check_caption(c, s.scene).correct for c, s in zip(caps, samples, strict=True)) / len(samples)

    def vqa_acc(answers):
        return sum(normalize_answer(a) == normalize_answer(t) for a, t in zip(answers, truth, strict=True)) / len(truth)

    per_type = {}
    for t in sorted(set(types)):
        idx = [i for i, x in enumerate(types) if x == t]
        per_type[t] = sum(normalize_answer(http_ans[i]) == normalize_answer(truth[i]) for i in idx) / len(idx)
    return {
        "scenes": scenes,
        "questions": len(truth),
        "http": {
            "caption_attribute_accuracy": caption_acc(http_caps),
            "vqa_accuracy": vqa_acc(http_ans),
            "vqa_per_type": per_type,
            "seconds": round(http_s, 1),
        },  # fmt: skip
        "in_process": {"caption_attribute_accuracy": caption_acc(local_caps), "vqa_accuracy": vqa_acc(local_ans)},
        "same_outputs": {
            "captions": sum(a == b for a, b in zip(http_caps, local_caps, strict=True)) / scenes,
            "answers": sum(a == b for a, b in zip(http_ans, local_ans, strict=True)) / len(truth),
        },  # fmt: skip
        "examples": [{"caption": c, "scene": s.scene.index} for c, s in list(zip(http_caps, samples))[:5]],
    }


def offline_reports(out: Path) -> dict:
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    ret, cap, vqa = (read(out / "clip/eval/retrieval.json"), read(out / "caption/eval/captioning.json"),
                     read(out / "vqa/eval/vqa.json"))  # fmt: skip
    steps = {}
    for run in ("clip", "caption", "vqa"):
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        steps[run] = {"steps": last.get("step"), "elapsed_s": last.get("elapsed_s")}
    m = ret.get("metrics", {})
    return {
        "training": steps,
        "retrieval": {k: m.get(k) for k in ("i2t_R@10", "t2i_R@10", "semantic_P@1")},
        "caption": {
            "attribute_accuracy": cap.get("metrics", {}).get("attribute_accuracy"),
            "n": cap.get("n"),
            "CIDEr": cap.get("metrics", {}).get("CIDEr"),
        },  # fmt: skip
        "vqa": {"accuracy": vqa.get("metrics", {}).get("accuracy"), "n": vqa.get("n")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-demo", help="the demo's directory (removed first unless --reuse)")
    ap.add_argument("--time", default="8m", help="the demo's training budget (its --time)")
    ap.add_argument("--reuse", action="store_true", help="keep what --out holds (times the HTTP part only)")
    ap.add_argument("--scenes", type=int, default=50, help="held-out test scenes asked through HTTP (default 50)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out = Path(args.out)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "budget": args.time}
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
        result["demo_seconds"] = round(run_demo(out, args.time), 1)
        print(f"fresh demo (--no-serve): {result['demo_seconds']:.0f} s", flush=True)
    proc, url, startup = start_service(out)
    try:
        result["service_start_s"] = round(startup, 1)
        result.update(measure(url, out, args.scenes))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["offline"] = offline_reports(out)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
