"""``mmfusion prune`` end to end: measure importance, remove heads and channels, recover with the original
model as teacher, and report what it cost and what it bought (R@10, semantic precision, images/s), or sweep
several ratios and draw the curve.

The output is an ordinary run: ``OUT/model`` (config + safetensors + tokenizer), and beside it
``prune_report.json`` (and ``prune_curve.{json,png}`` for a sweep); with recovery also the training run's
metrics and plots.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.pairs import PairSampler
from ..eval.report import evaluate_retrieval, shapes_config_of
from ..models import load as load_native
from ..models import save_model
from ..models.clip import CLIP
from ..utils.io import atomic_write_json
from .prune import TOWERS, Importance, batches_of, measure_importance, prune, shapes_batches

log = logging.getLogger(__name__)
RECOVER_LR = 2e-4  # recovery's peak learning rate (from-scratch training peaks at 2e-3)


@dataclass
class PruneOptions:
    heads: float = 0.3  # fraction of each tower's attention heads removed
    mlp: float = 0.3  # fraction of each tower's MLP hidden channels removed
    towers: tuple[str, ...] = TOWERS
    data: str = "shapes"  # where importance is measured: the model's ShapesWorld, or a caption folder
    batches: int = 8
    batch_size: int = 64
    seed: int = 0
    recover: str | None = None  # a training budget ("2m", "500" steps) to fine-tune after pruning; None: none
    teacher: str | None = "original"  # recovery's teacher: the model before pruning, another model, or None
    eval_n: int = 500  # ShapesWorld test scenes (or folder images) ranked for the report; 0: no evaluation
    sweep: tuple[float, ...] = ()  # ratios (heads and mlp alike) to prune at and draw, instead of one
    overrides: tuple[str, ...] = ()  # dotted training options for the recovery, e.g. --train.lr=1e-4


def importance_batches(model: CLIP, opts: PruneOptions):
    if opts.data == "shapes":
        return shapes_batches(model, opts.batches, opts.batch_size, opts.seed)
    from ..data.datasets import CaptionFolder
    from ..data.pairs import FolderPairs
    from .clip_task import resolve_caption_folder

    folder = CaptionFolder(resolve_caption_folder(opts.data), model.cfg.vision.image_size)
    sampler = PairSampler(FolderPairs(folder, model.cfg.vision.image_size), opts.seed)
    return batches_of(model, sampler, opts.batches, opts.batch_size)


def image_rate(models: dict[str, CLIP], batch: int = 32, repeats: int = 7) -> dict[str, float]:
    """Images/s of each model's image tower on the same preprocessed batch, the models alternating, median, on
    one thread (torch's intra-op threads stall when another process holds a core: one thread is the comparison
    that load does not distort)."""
    size = next(iter(models.values())).cfg.vision.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {k: [] for k in models}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rates(models, x, rates, repeats)
    finally:
        torch.set_num_threads(threads)


def _rates(models: dict[str, CLIP], x: torch.Tensor, rates: dict[str, list[float]], repeats: int) -> dict:
    batch = len(x)
    with torch.inference_mode():
        for m in models.values():
            m.encode_image(x)  # warm-up
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m.encode_image(x)
                rates[k].append(batch / (time.perf_counter() - t0))
    return {k: round(statistics.median(v), 1) for k, v in rates.items()}


def quality(model: CLIP, opts: PruneOptions) -> dict[str, float]:
    if opts.eval_n <= 0:
        return {}
    r = evaluate_retrieval(model, opts.data, opts.eval_n, progress=False)
    keys = ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "semantic_P@1")
    return {k: round(float(r["metrics"][k]), 4) for k in keys if k in r.get("metrics", {})}


def recover(pruned_dir: Path, original: str, out: Path, opts: PruneOptions) -> CLIP:
    """Fine-tune the pruned model for ``opts.recover``, by default learning from the original model too."""
    from ..config import from_dict, with_overrides
    from .config import RunConfig
    from .run import train

    budget = str(opts.recover)
    teacher = original if opts.teacher == "original" else opts.teacher
    length = {"steps": int(budget)} if budget.isdigit() else {"time": budget}
    data: dict[str, Any] = {
        "task": "clip",
        "init": {"from_clip": str(pruned_dir), "whiten_patches": 0},
        "distill": {"teacher": teacher},
        # fine-tuning, not training from scratch: a tenth of the from-scratch peak rate, a short warm-up
        "train": {**length, "lr": RECOVER_LR, "warmup_steps": 10},
        "data": {"source": opts.data},
        "out": str(out),
    }
    if opts.data == "shapes":  # the world the model learned, at full complexity: it is past the curriculum
        world = asdict(shapes_config_of(load_native(pruned_dir)))
        data["data"]["shapes"] = {**world, "curriculum": 0}
    train(from_dict(RunConfig, with_overrides(data, list(opts.overrides))))
    return load_native(out)


def prune_run(model_path: str, out: str | Path, opts: PruneOptions) -> dict[str, Any]:
    """Prune ``model_path`` (a native CLIP run or checkpoint) into the run ``out``; returns the report."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (a pruned run is written whole)")
    model = load_native(model_path)
    if not isinstance(model, CLIP):
        raise ValueError(f"{model_path} is a {getattr(model, 'family', '?')} model; `mmfusion prune` prunes a CLIP")
    if getattr(model, "precision", "").startswith("int8"):
        raise ValueError(f"{model_path} is kept as int8; prune the fp32 checkpoint it came from")
    importance = measure_importance(model, importance_batches(model, opts), opts.towers)
    log.info("importance measured on %d batches of %d", importance.batches, opts.batch_size)
    if opts.sweep:
        return sweep(model, model_path, importance, out, opts, t0)
    report = one_ratio(model, model_path, importance, out, opts, opts.heads, opts.mlp)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "prune_report.json", report)
    return report


def one_ratio(model: CLIP, model_path: str, importance: Importance, out: Path, opts: PruneOptions,
              heads: float, mlp: float) -> dict[str, Any]:  # fmt: skip
    pruned, kept = prune(model, importance, heads, mlp, opts.towers)
    if opts.recover:
        save_model(pruned, out / "pruned")
        pruned = recover(out / "pruned", str(model_path), out, opts)
    else:
        save_model(pruned, out / "model")
    speed = image_rate({"before": model, "after": pruned})
    report = {
        "task": "prune",
        "source": str(model_path),
        "out": str(out),
        "heads": heads,
        "mlp": mlp,
        "towers": list(opts.towers),
        "kept": kept,
        "importance": importance.as_dict(),
        "recover": opts.recover,
        "teacher": (str(model_path) if opts.teacher == "original" else opts.teacher) if opts.recover else None,
        "images_per_s": speed,
        "speedup": round(speed["after"] / speed["before"], 3),
        "quality": {"before": quality(model, opts), "after": quality(pruned, opts)},
    }
    return report


def sweep(model: CLIP, model_path: str, importance: Importance, out: Path, opts: PruneOptions, t0: float) -> dict:
    """Prune at each ratio of ``opts.sweep`` (each in ``out/ratio-R``), measure, and draw quality vs speed."""
    points = [{"ratio": 0.0, **quality(model, opts)}]
    models = {0.0: model}
    for r in opts.sweep:
        rep = one_ratio(model, model_path, importance, out / f"ratio-{r:g}", opts, r, r)
        points.append({"ratio": r, **rep["quality"]["after"], "parameters": rep["kept"]["parameters"]["after"]})
        models[r] = load_native(out / f"ratio-{r:g}")
    speed = image_rate({str(r): m for r, m in models.items()}, repeats=15)  # all side by side, at the end
    for p in points:
        p["images_per_s"] = speed[str(p["ratio"])]
    report = {"task": "prune-sweep", "source": str(model_path), "recover": opts.recover, "points": points,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    atomic_write_json(out / "prune_curve.json", report)
    plot_curve(points, out / "prune_curve.png", str(model_path))
    return report


def plot_curve(points: list[dict], path: Path, title: str) -> Path:
    """Quality (R@10 both ways, semantic P@1) against images/s, each point labelled with its ratio."""
    from ..eval.plots import _save, plt  # matplotlib (Agg) and the project's one way to write a figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [p["images_per_s"] for p in points]
    for key, label in (("i2t_R@10", "R@10 image→text"), ("t2i_R@10", "R@10 text→image"),
                       ("semantic_P@1", "semantic P@1")):  # fmt: skip
        if all(key in p for p in points):
            ax.plot(x, [p[key] for p in points], marker="o", label=label)
    for p in points:
        ax.annotate(f"{p['ratio']:.0%}", (p["images_per_s"], p.get("i2t_R@10", 0)), xytext=(3, 5),
                    textcoords="offset points", fontsize=7)  # fmt: skip
    ax.set_xlabel("image encoding, images/s (batch 32)")
    ax.set_ylabel("quality")
    ax.set_title(f"pruning {Path(title).name}: quality against speed (labels: heads and MLP removed)", fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)
