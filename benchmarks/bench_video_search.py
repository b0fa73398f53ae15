"""Video search on ShapesWorld videos with known answers: the right video in the top 5, and the right segment.

The gallery is :func:`mmfusion.data.video_gallery.export_video_gallery` (the demo's own): ``--videos`` MP4s (H.264,
PyAV), each 3-5 ShapesWorld clips back to back (1.5-3 s each, 64x64 at 8 fps; a moving object, and up to one still
object, per scene; the movers of one video have different colours). It is indexed by ``mmfusion index``'s code
path (frames every ``--every`` seconds and at scene cuts, pooled into segments) with a real CLIP trained on
ShapesWorld (default ``runs/bench-compress/teacher``, a 5-minute clip-tiny).

Queries, one per video, from the ground truth: the rarest colour+shape among the video's movers (the objects its
clips are about; the combination the fewest videos of the gallery hold; ties: the earliest), "a {colour}
{shape}". With 8 colours x 6 shapes over ~160 scenes a combination recurs, so the rule counts every video that
truly holds it: a
query's right videos are every video with a scene holding an object of that colour and shape, its right segments
those scenes. *Video hit*: a right video is among the top 5 results; *segment hit*: the first right video among
them is shown at a segment whose representative frame (the thumbnail the user sees) lies inside a right scene of
that video. Reported beside them, so that the bars can be judged: the chance of a video hit for a random top 5;
precision@5 (right videos in the top 5 over min(5, right videos)) with its chance level; the share of right
videos in the top 5 shown at a right segment; and the mean time-IoU of the shown segment with its scene.

Run: python benchmarks/bench_video_search.py [--model runs/bench-compress/teacher] [--videos 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from datetime import date
from pathlib import Path

from mmfusion.data.video_gallery import export_video_gallery, read_gallery
from mmfusion.index import Index
from mmfusion.index.video import VideoOptions

K = 5


def holds(scene: dict, colour: str, shape: str) -> bool:
    return any(o["colour"] == colour and o["shape"] == shape for o in scene["objects"])


def right_scenes(truth: dict, colour: str, shape: str) -> dict[str, list[dict]]:
    """{video file name: its scenes holding a ``colour`` ``shape``}, for the videos holding one."""
    right = {os.path.basename(w["file"]): [s for s in w["scenes"] if holds(s, colour, shape)] for w in truth["videos"]}
    return {name: scenes for name, scenes in right.items() if scenes}


def queries(truth: dict) -> list[dict]:
    """One query per video (its movers' rarest colour+shape), with every right (video, scene) of the gallery."""
    out = []
    for video in truth["videos"]:
        combos = [(s["objects"][0]["colour"], s["objects"][0]["shape"]) for s in video["scenes"]]  # the movers
        colour, shape = min(combos, key=lambda c: len(right_scenes(truth, *c)))  # min keeps the earliest of ties
        out.append({"text": f"a {colour} {shape}", "right": right_scenes(truth, colour, shape)})
    return out


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / max(a[1] - a[0] + b[1] - b[0] - inter, 1e-9)


def judge(q: dict, results: list) -> dict:
    """Video hit, segment hit and time-IoU of one query's top-K results (the rule in the module docstring)."""
    names = [os.path.basename(r.path) for r in results[:K]]
    hits = [r for r in results[:K] if os.path.basename(r.path) in q["right"]]
    at_segment = [shown_in(r, q["right"][os.path.basename(r.path)]) for r in hits]
    precision = len(hits) / min(K, len(q["right"]))
    if not hits:
        return {"query": q["text"], "video": False, "segment": False, "iou": 0.0, "top": names, "p5": 0.0,
                "segments_right": []}  # fmt: skip
    m, scenes = hits[0].metadata, q["right"][os.path.basename(hits[0].path)]
    best_iou = max(iou((m["start"], m["end"]), (s["start"], s["end"])) for s in scenes)
    return {"query": q["text"], "video": True, "segment": at_segment[0], "iou": best_iou, "top": names,
            "p5": precision, "segments_right": at_segment,
            "shown": [m["start"], m["end"], m["thumb"]], "right": {k: [[s["start"], s["end"]] for s in v]
                                                                   for k, v in q["right"].items()}}  # fmt: skip


def shown_in(result, scenes: list[dict]) -> bool:
    """Whether a video result's representative frame lies inside one of ``scenes``."""
    return any(s["start"] <= result.metadata["thumb"] < s["end"] for s in scenes)


def chance(n_videos: int, n_right: int, k: int = K) -> float:
    """Probability that a random top ``k`` of ``n_videos`` holds at least one of ``n_right`` right videos."""
    return 1.0 - math.comb(n_videos - n_right, k) / math.comb(n_videos, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench-compress/teacher", help="the CLIP that embeds frames and queries")
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between sampled frames")
    ap.add_argument("--out", default="runs/bench-video-search", help="where the gallery and the index are written")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    export_video_gallery(out / "gallery", n_videos=args.videos, seed=args.seed)
    gallery_s = time.perf_counter() - t0
    truth = read_gallery(out / "gallery")
    seconds = sum(v["duration"] for v in truth["videos"])
    shutil.rmtree(out / "db", ignore_errors=True)  # a fresh index: the timing is of indexing everything
    with Index.open(out / "db", model=args.model, write=True) as ix:
        report = ix.update([out / "gallery" / "videos"], progress=False, video=VideoOptions(every_s=args.every))
        info = ix.info()
    with Index.open(out / "db") as ix:
        qs = queries(truth)
        t1 = time.perf_counter()
        judged = [judge(q, ix.search(q["text"], k=K)) for q in qs]
        search_ms = (time.perf_counter() - t1) / len(qs) * 1000
    n = len(judged)
    result = {
        "benchmark": "video_search",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": args.model,
        "videos": len(truth["videos"]),
        "scenes": sum(len(v["scenes"]) for v in truth["videos"]),
        "video_seconds": round(seconds, 2),
        "segments": info["segments"],
        "frames_embedded": report.model_calls,
        "skipped": len(report.skipped),
        "every_s": args.every,
        "queries": n,
        "video_top5": round(sum(j["video"] for j in judged) / n, 4),
        "segment": round(sum(j["segment"] for j in judged) / n, 4),
        "segment_iou_mean": round(sum(j["iou"] for j in judged) / n, 4),
        "chance_video_top5": round(sum(chance(len(truth["videos"]), len(q["right"])) for q in qs) / n, 4),
        "precision_at_5": round(sum(j["p5"] for j in judged) / n, 4),
        "chance_precision_at_5": round(sum(len(q["right"]) / len(truth["videos"]) for q in qs) / n, 4),
        "right_videos_per_query": round(sum(len(q["right"]) for q in qs) / n, 2),
        "segment_all_right_videos": round(
            sum(map(sum, (j["segments_right"] for j in judged)))
            / max(1, sum(len(j["segments_right"]) for j in judged)),
            4,
        ),  # fmt: skip
        "index_s": round(report.elapsed_s, 2),
        "index_s_per_video_second": round(report.elapsed_s / seconds, 4),
        "gallery_write_s": round(gallery_s, 2),
        "search_ms_per_query": round(search_ms, 2),
        "misses": [j for j in judged if not (j["video"] and j["segment"])],
    }
    for key in ("videos", "scenes", "video_seconds", "segments", "frames_embedded", "queries", "video_top5",
                "segment", "segment_iou_mean", "chance_video_top5", "precision_at_5", "chance_precision_at_5",
                "right_videos_per_query", "segment_all_right_videos",
                "index_s", "index_s_per_video_second", "search_ms_per_query"):  # fmt: skip
        print(f"{key:>26}: {result[key]}")
    for miss in result["misses"]:
        print(f"  miss: {miss['query']!r}: video {miss['video']}, segment {miss['segment']}, top {miss['top']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
