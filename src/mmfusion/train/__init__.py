"""Training: the loop, checkpoints, and one task adapter per model family."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import DataConfig, RunConfig, TrainConfig, parse_duration
from .trainer import Trainer, TrainResult, pick_device, set_threads

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "TrainResult", "Trainer", "parse_duration", "train"]


def train(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """Train a model as ``cfg`` says; with ``resume``, continue from the newest checkpoint in ``cfg.out``.

    Returns:
        Where the run wrote its model, how many steps and samples it took, and the last metrics.
    """
    from ..data.tokenizer import Tokenizer
    from .checkpoint import latest_checkpoint
    from .clip_task import ClipTask

    if cfg.task not in ("clip", "fusion", "caption", "vqa", "video"):
        raise ValueError(f"unknown task {cfg.task!r}; mmfusion can train: clip, fusion, caption, vqa, video")
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
    if resume and ckpt is not None and cfg.task in ("clip", "caption", "vqa"):
        from ..models.registry import model_config

        _, mcfg = model_config(cfg.preset, cfg.model)
        text = {"clip": "text", "caption": "decoder", "vqa": "question"}[cfg.task]
        tokenizer = Tokenizer.load(ckpt, getattr(mcfg, text).context_length)
    elif resume:
        log.warning("nothing to resume in %s: starting a new run", out)
    if cfg.task == "fusion":
        from .fusion_task import FusionTask

        task = FusionTask.build(cfg, device)
    elif cfg.task == "caption":
        from .caption_task import CaptionTask

        task = CaptionTask.build(cfg, device, tokenizer)
    elif cfg.task == "vqa":
        from ..models.registry import model_config
        from .vqa_task import GenerativeVQATask, VQATask

        generative = model_config(cfg.preset, cfg.model)[0] == "captioner"  # answers through a caption decoder
        task = (GenerativeVQATask if generative else VQATask).build(cfg, device, tokenizer)
    elif cfg.task == "video":
        from .video_task import VideoTask

        task = VideoTask.build(cfg, device)
    else:
        task = ClipTask.build(cfg, device, tokenizer)
    trainer = Trainer(cfg, task, out, device)
    if resume:
        trainer.resume()
    result = trainer.run()
    if cfg.task == "fusion":  # the held-out report, beside the model
        from ..eval.classification import evaluate_fusion

        result.report = evaluate_fusion(task.model.eval(), task.test, out / "eval")
    elif cfg.task == "video":  # top-1/top-5 and the confusion matrix on the held-out clips
        result.report = task.evaluate(out / "eval")
    return result
