"""A training run from start to report: the family's task adapter from the registry, the trainer, then the
adapter's held-out evaluation. No family is named here: :data:`mmfusion.models.registry.FAMILIES` says which
adapter trains which preset as which task."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data.tokenizer import Tokenizer
from ..models.registry import train_tasks
from .checkpoint import latest_checkpoint
from .config import RunConfig
from .trainer import Trainer, TrainResult, pick_device, set_threads

log = logging.getLogger(__name__)


def train(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """Train a model as ``cfg`` says; with ``resume``, continue from the newest checkpoint in ``cfg.out``.

    After training, an adapter with ``evaluate(out)`` and ``summarize(report, out)`` methods (fusion, video)
    scores the model on its held-out split; the report lands in ``OUT/eval/`` and in the result.

    Returns:
        Where the run wrote its model, how many steps and samples it took, and the last metrics.
    """
    if cfg.task not in train_tasks():
        raise ValueError(f"unknown task {cfg.task!r}; mmfusion can train: {', '.join(train_tasks())}")
    spec = cfg.family()
    adapter = spec.task_adapter(cfg.task)  # before any data is made: a wrong preset fails at once
    set_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is not None and not resume:
        raise FileExistsError(
            f"{out} already holds a run (checkpoint {ckpt.name}): add --resume to continue it, or choose another --out"
        )
    torch.manual_seed(cfg.train.seed)
    tokenizer = None
    if resume and ckpt is not None and spec.text_field:  # the run's own vocabulary, not a freshly trained one
        tokenizer = Tokenizer.load(ckpt, getattr(cfg.model_config(), spec.text_field).context_length)
    elif resume and ckpt is None:
        log.warning("nothing to resume in %s: starting a new run", out)
    task = adapter.build(cfg, device, tokenizer)
    trainer = Trainer(cfg, task, out, device)
    if resume:
        trainer.resume()
    result = trainer.run()
    evaluate = getattr(task, "evaluate", None)
    if evaluate is not None:  # the held-out report, beside the model
        result.report = evaluate(out / "eval")
        result.summary = task.summarize(result.report, out / "eval")
    return result
