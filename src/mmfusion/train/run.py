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
from .distributed import DistContext, device_for, setup, teardown
from .trainer import Trainer, TrainResult, pick_device, set_threads

log = logging.getLogger(__name__)


def train(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """Train a model as ``cfg`` says; with ``resume``, continue from the newest checkpoint in ``cfg.out``.

    After training, an adapter with ``evaluate(out)`` and ``summarize(report, out)`` methods (fusion, video)
    scores the model on its held-out split; the report lands in ``OUT/eval/`` and in the result.

    Under ``torchrun`` (several processes), every process runs this: they join one process group, each trains on
    its slice of the global batch, rank 0 alone writes, and the evaluation runs once, on rank 0.

    Returns:
        Where the run wrote its model, how many steps and samples it took, and the last metrics.
    """
    if cfg.task not in train_tasks():
        raise ValueError(f"unknown task {cfg.task!r}; mmfusion can train: {', '.join(train_tasks())}")
    spec = cfg.family()
    adapter = spec.task_adapter(cfg.task)  # before any data is made: a wrong preset fails at once
    set_threads(cfg.train.threads)
    ctx = setup(cfg.train.device, cfg.train.dist_backend)
    finished = False
    try:
        result = _train(cfg, resume, spec, adapter, ctx)
        finished = True
        return result
    finally:
        teardown(finished)


def _train(cfg: RunConfig, resume: bool, spec, adapter, ctx: DistContext) -> TrainResult:
    if ctx.enabled:
        _name_ranks(ctx)
    device = pick_device(device_for(ctx, cfg.train.device))
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
    task.dist = ctx
    trainer = Trainer(cfg, task, out, device, ctx)
    if resume:
        trainer.resume()
    result = trainer.run()
    evaluate = getattr(task, "evaluate", None)
    if evaluate is not None and ctx.is_main:  # the held-out report, beside the model (once, by rank 0)
        result.report = evaluate(out / "eval")
        result.summary = task.summarize(result.report, out / "eval")
    return result


def _name_ranks(ctx: DistContext) -> None:
    """Log lines say which process speaks: ``[rank 1/2] ...``."""

    def add_rank(record: logging.LogRecord) -> bool:
        if not getattr(record, "ranked", False):
            record.msg, record.ranked = f"[rank {ctx.rank}/{ctx.world_size}] {record.msg}", True
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add_rank)
