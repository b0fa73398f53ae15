"""Training: the loop, checkpoints, one task adapter per model family, and the run that ties them together."""

from __future__ import annotations

from .config import DataConfig, RunConfig, TrainConfig, parse_duration
from .run import train
from .trainer import Trainer, TrainResult

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "TrainResult", "Trainer", "parse_duration", "train"]
