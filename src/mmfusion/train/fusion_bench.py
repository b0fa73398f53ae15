"""`mmfusion bench fusion`: every fusion strategy and each unimodal baseline on the two ShapesWorld tasks.

For each task, seed and model the same data, steps and optimiser; reported per model: held-out accuracy
(mean +- std over seeds), parameters, training time, and accuracy with one modality missing at test time,
for models trained without and with modality dropout. Writes ``fusion_bench.json``, ``fusion_bench.md``
(the table) and ``fusion_bench.png`` (a bar chart) into the output folder.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..data.fusion_tasks import TASKS, FusionTaskConfig, make_fusion_data
from ..modules.fusions import FUSIONS
from .config import FusionDataConfig, RunConfig, TrainConfig
from .fusion_task import FusionTask
from .trainer import Trainer, pick_device, set_threads

log = logging.getLogger(__name__)

BASELINES = {"image only": ("image",), "audio only": ("audio",)}
WHY_LATE_FAILS = (
    "Late fusion decides per modality and then adds the modalities' scores (mean, weighted or product of "
    "experts). On correspondence the label is an interaction: 'match' holds when the image's colour equals "
    "the sound's colour, and for every colour the image alone and the sound alone are each at 50/50. A sum "
    "f(image) + g(sound) cannot represent an equality of two variables (like XOR, it is not additively "
    "separable), so late fusion stays near chance. Early, attention and cross-attention fusion combine the "
    "features before deciding and can learn the comparison."
)


def run_one(
    data, task_cfg: FusionTaskConfig, strategy: str, modalities: tuple[str, ...], seed: int, steps: int,
    batch_size: int, lr: float, modality_dropout: float, workdir: Path, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Train one model for ``steps`` and evaluate it on the test split."""
    model_over: dict[str, Any] = {"strategy": strategy, "modalities": list(modalities)}
    if modality_dropout:
        model_over["modality_dropout"] = modality_dropout
    cfg = RunConfig(
        task="fusion",
        preset="fusion-small",
        model=model_over,
        train=TrainConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            warmup_steps=min(30, steps // 10),
            progress=False,
            save_every=10**9,
            log_every=max(1, steps // 20),
            keep_checkpoints=1,
        ),  # fmt: skip
        fusion=FusionDataConfig(task=task_cfg.task, image_size=task_cfg.image_size, snr_db=task_cfg.snr_db),
        out=str(workdir),
    )
    torch.manual_seed(seed)
    task = FusionTask.build(cfg, device, data=data)
    t0 = time.perf_counter()
    Trainer(cfg, task, workdir, device).run()
    seconds = time.perf_counter() - t0
    report = task.evaluate()
    return {
        "accuracy": report["metrics"]["accuracy"],
        "macro_f1": report["metrics"]["macro_f1"],
        "missing": {m: v["accuracy"] for m, v in report["missing_modality"].items()},
        "params": sum(p.numel() for p in task.model.parameters()),
        "seconds": seconds,
    }


def run_bench(
    out: str | Path,
    tasks: tuple[str, ...] = TASKS,
    strategies: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] = (0, 1),
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    train_size: int = 6000,
    test_size: int = 1500,
    dropout_seeds: int = 1,
    modality_dropout: float = 0.3,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and write its table, JSON and chart into ``out``."""
    from tqdm.auto import tqdm

    set_threads(threads)
    device = pick_device("cpu")
    strategies = tuple(strategies or FUSIONS)
    unknown = [s for s in strategies if s not in FUSIONS]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(FUSIONS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = [(s, s, ("image", "audio")) for s in strategies] + [(n, "concat", m) for n, m in BASELINES.items()]
    jobs = [(t, name, strat, mods, seed, 0.0) for t in tasks for name, strat, mods in models for seed in seeds]
    fused = models[: len(strategies)]
    d_seeds = seeds[:dropout_seeds]
    jobs += [(t, n, st, mo, seed, modality_dropout) for t in tasks for n, st, mo in fused for seed in d_seeds]
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    bar = tqdm(total=len(jobs), desc="fusion bench", unit="run", disable=not progress)
    data_cache: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        for i, (t, name, strat, mods, seed, md) in enumerate(jobs):
            if t not in data_cache:
                tcfg = FusionTaskConfig(task=t)
                tr = make_fusion_data(tcfg, "train", train_size, progress)
                te = make_fusion_data(tcfg, "test", test_size, progress)
                data_cache[t] = (tcfg, (tr, te, {"source": "shapes", "task": vars(tcfg), "test_size": test_size}))
            tcfg, data = data_cache[t]
            bar.set_postfix_str(f"{t} {name}{' +dropout' if md else ''} seed {seed}")
            r = run_one(data, tcfg, strat, mods, seed, steps, batch_size, lr, md, Path(tmp) / f"run{i}", device)
            key = name + (" +modality dropout" if md else "")
            results[t].setdefault(key, {"strategy": strat, "modalities": list(mods), "runs": []})["runs"].append(r)
            bar.update(1)
    bar.close()
    summary = _summarise(results)
    report = {
        "task": "fusion_bench",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "seeds": list(seeds),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "train_size": train_size,
            "test_size": test_size,
            "modality_dropout": modality_dropout,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "total_seconds": time.perf_counter() - started,
        "results": summary,
        "why_late_fusion_fails_on_correspondence": WHY_LATE_FAILS,
    }
    (out / "fusion_bench.json").write_text(json.dumps(report, indent=2))
    (out / "fusion_bench.md").write_text(markdown_table(report))
    report["plot"] = str(plot_bench(summary, out / "fusion_bench.png"))
    return report


def _summarise(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for t, models in results.items():
        out[t] = {}
        for name, r in models.items():
            accs = [x["accuracy"] for x in r["runs"]]
            missing = {m: statistics.mean(x["missing"][m] for x in r["runs"]) for m in r["runs"][0]["missing"]}
            out[t][name] = {
                "strategy": r["strategy"],
                "modalities": r["modalities"],
                "accuracy_mean": statistics.mean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accuracies": accs,
                "missing_modality_accuracy": missing,
                "params": r["runs"][0]["params"],
                "seconds_mean": statistics.mean(x["seconds"] for x in r["runs"]),
            }
    return out


def markdown_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"Fusion benchmark ({report['date']}): {s['steps']} steps of batch {s['batch_size']}, "
        f"{len(s['seeds'])} seeds, {s['train_size']} train / {s['test_size']} test examples, "
        f"{report['total_seconds'] / 60:.1f} minutes in all.",
        "",
    ]
    for t, models in report["results"].items():
        lines += [f"**{t}**", "", "| model | accuracy | params | train time | without image | without audio |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, r in models.items():
            miss = r["missing_modality_accuracy"]
            gone = [f"{miss[m]:.3f}" if m in miss else "–" for m in ("image", "audio")]  # – : a unimodal model
            lines.append(
                f"| {name} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['params']:,} | "
                f"{r['seconds_mean']:.1f} s | {gone[0]} | {gone[1]} |"
            )
        lines.append("")
    lines += ["Why late fusion fails on correspondence: " + report["why_late_fusion_fails_on_correspondence"], ""]
    return "\n".join(lines)


def plot_bench(summary: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        names = [n for n in summary[t] if "dropout" not in n]
        means = [summary[t][n]["accuracy_mean"] for n in names]
        stds = [summary[t][n]["accuracy_std"] for n in names]
        colours = ["#7f8c8d" if n in BASELINES else "#2e86c1" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(t)
        chance = 0.5 if t == "correspondence" else 1 / 48
        ax.axhline(chance, color="#c0392b", lw=1, ls="--", label="chance")
        ax.legend(loc="upper right", fontsize=8)
        for i, m in enumerate(means):
            ax.text(i, m + 0.02, f"{m:.2f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["run_bench", "markdown_table", "plot_bench"]
