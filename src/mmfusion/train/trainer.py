"""The training loop shared by every task: AdamW with linear warm-up and cosine decay, gradient
clipping, optional bf16 autocast, accumulation, a progress bar, a metrics log, atomic resumable
checkpoints and a wall-clock budget.

A task adapter (such as :class:`~mmfusion.train.clip_task.ClipTask`) owns the model, makes the batch of
a given step (a pure function of the step, so resuming is exact) and runs forward and backward. The
trainer owns everything else.

Output directory::

    run.yaml            the resolved run config
    metrics.jsonl       one line per logged step
    checkpoints/        resumable checkpoints (step-NNNNNN/)
    model/              the final model, loadable with mmfusion.load(OUT)
    plots/training.png  loss, accuracy, learning rate and temperature curves
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..utils.io import atomic_write_text
from ..utils.threads import ThreadPlan, configure_threads
from .checkpoint import latest_checkpoint, remove_partial, restore_checkpoint, save_checkpoint
from .config import RunConfig, parse_duration
from .distributed import DistContext, broadcast_state, sync_gradients

log = logging.getLogger(__name__)
CALIBRATION_STEPS = 8  # steps timed (after two warm-up steps) to fit a time budget
REFIT_AT = (50, 100, 200, 400)  # steps at which a budgeted run re-fits its length (in its first half)
REFIT_WINDOW = 40  # from the median of this many recent step times
BATCH_WORKERS = 0  # threads beside torch that need a core of their own: the batch prefetch does not


class Task(Protocol):
    name: str
    model: torch.nn.Module

    def dataset_size(self) -> int: ...  # 0 for an endless stream

    def prepare(self, step: int) -> Any: ...

    def train_step(self, batch: Any, accum: int, autocast: Any) -> dict[str, float]: ...

    def after_optimizer_step(self) -> None: ...

    def status(self) -> dict[str, float]: ...

    def save_model(self, path: Path) -> Path: ...

    def train_modules(self) -> dict[str, torch.nn.Module]: ...


class TaskDefaults:
    """What most task adapters share: nothing to do after an optimiser step, no status beyond the loss, the
    model saved as a checkpoint directory, and in several processes each one's slice of the global batch
    (losses that are means over samples: the gradients are averaged). Adapters inherit it and override what
    they need (CLIP clamps its temperature after each step and reports it)."""

    model: torch.nn.Module
    cfg: RunConfig
    dist: DistContext = DistContext()
    global_loss = False  # True: each process back-propagates its share of one global loss (gradients summed)

    def positions(self, step: int) -> tuple[int, int]:
        """(first stream position, count) of this process's part of step ``step``'s global batch."""
        B = self.cfg.train.batch_size
        offset, part = self.dist.shard(B)
        return step * B + offset, part

    def mine(self, indices):
        """This process's slice of the global batch's ``indices``."""
        offset, part = self.dist.shard(len(indices))
        return indices[offset : offset + part]

    def after_optimizer_step(self) -> None:
        pass

    def status(self) -> dict[str, float]:
        return {}

    def save_model(self, path: Path) -> Path:
        from ..models.checkpoint import save_model

        return save_model(self.model, path)

    def train_modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the model that are no part of it (a distillation loss's projection), by name:
        the optimiser steps their parameters and the resumable checkpoints keep them; the saved model does not."""
        return {}


def batch_indices(seed: int, step: int, batch: int, size: int):
    """The examples of optimiser step ``step``: for a dataset of ``size`` examples, positions ``step * batch`` on
    in a sequence of fresh seeded permutations, one per epoch (a pure function of the step, so a resumed run
    sees the same batches; a batch larger than the data spans several epochs); for a stream (``size`` 0), the
    next ``batch`` indices."""
    if not size:
        return np.arange(step * batch, step * batch + batch)
    epoch, pos = divmod(step * batch, size)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(size)
                            for e in range(epoch, epoch + 2 + batch // size)])  # fmt: skip
    return order[pos : pos + batch]


@dataclass
class TrainResult:
    out: Path
    steps: int
    samples: int
    elapsed_s: float
    last: dict[str, float]
    report: dict[str, Any] | None = None  # the held-out evaluation, for tasks that make one at the end
    summary: list[str] = field(default_factory=list)  # the report in a few lines for a person


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA GPU is available; use --train.device=cpu")
    return dev


def param_groups(model: torch.nn.Module, weight_decay: float, *more: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only: gains, biases and the temperature are left alone (as in CLIP). The
    parameters of ``more`` modules (trained beside the model) follow the model's in each group."""
    decay, no_decay = [], []
    for module in (model, *more):
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int | None, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``base``, then cosine decay to ``base * min_ratio`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Runs a task to completion, resuming from the newest checkpoint in ``out`` when asked.

    Args:
        cfg: the run config (its ``train`` part is used here).
        task: the task adapter, already holding its model on the right device.
        out: output directory.
        resume_state: trainer state of the checkpoint being resumed (None for a fresh run).
    """

    def __init__(self, cfg: RunConfig, task: Task, out: Path, device: torch.device, dist: DistContext | None = None):
        self.cfg, self.task, self.out, self.device = cfg, task, Path(out), device
        self.dist = dist or DistContext()
        t = cfg.train
        if sum(x is not None for x in (t.steps, t.epochs, t.time)) != 1:
            raise ValueError("say how long to train with exactly one of --steps, --epochs or --time")
        if t.epochs is not None and task.dataset_size() == 0:
            raise ValueError("the ShapesWorld stream has no epochs (it never repeats): use --steps or --time")
        if (t.batch_size // self.dist.world_size) % max(1, t.accum_steps) or t.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {t.batch_size} must be divisible by accum_steps {t.accum_steps} times "
                             f"the {self.dist.world_size} process(es)")  # fmt: skip
        self.budget_s = parse_duration(t.time) if t.time is not None else None
        self.extra = task.train_modules() if hasattr(task, "train_modules") else {}
        self.opt = torch.optim.AdamW(
            param_groups(task.model, t.weight_decay, *self.extra.values()),
            lr=t.lr,
            betas=tuple(t.betas),
            eps=t.eps,
            fused=device.type == "cuda" or None,
        )
        self.step, self.elapsed_before = 0, 0.0
        self.total: int | None = self._planned_steps()

    def _planned_steps(self) -> int | None:
        t = self.cfg.train
        if t.steps is not None:
            return t.steps
        if t.epochs is not None:
            return max(1, math.ceil(t.epochs * self.task.dataset_size() / t.batch_size))
        return None  # fitted to the time budget after calibration

    def warmup(self) -> int:
        """Warm-up steps: at most a tenth of a run of known length. A time budget keeps the configured
        value, since its length is only known after calibration and a shorter warm-up then would jump."""
        w = self.cfg.train.warmup_steps
        return max(1, min(w, self.total // 10)) if self.total and self.budget_s is None else max(1, w)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints -----------------------------------------------------------------------------

    def resume(self) -> bool:
        """Restore the newest checkpoint in ``out/checkpoints``; False when there is none."""
        if self.dist.is_main:
            remove_partial(self.out / "checkpoints")
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            return False
        state = restore_checkpoint(ckpt, self.task.model, self.opt, self.extra)
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        if self.total is None or self.budget_s is not None:
            self.total = state.get("total_steps") or self.total
        if self.dist.is_main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total,
            "elapsed_s": self._elapsed(),
            "samples": self.step * self.cfg.train.batch_size,
            "task": self.task.name,
            "run": asdict(self.cfg),
        }

    def save(self) -> Path | None:
        if not self.dist.is_main:  # every process holds the same weights and optimiser state: one writes them
            return None
        return save_checkpoint(
            self.out / "checkpoints", self.task.model, self.opt, self._state(), self.cfg.train.keep_checkpoints,
            self.extra,
        )  # fmt: skip

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past the checkpoint (and a line cut short by a kill) before continuing."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    # -- the loop --------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def _calibrate(self, step_times: list[float]) -> None:
        """Fit the schedule length to the time budget from the measured step time. The first fit comes
        from a handful of steps, when caches and the machine's other load may still be settling; the
        run re-fits at a few later steps (``REFIT_AT``, in its first half), so that it neither stops
        short of the budget nor hits the hard stop before the schedule has decayed."""
        per_step = sorted(step_times)[len(step_times) // 2]
        remaining = self.budget_s - self._elapsed() - 3.0  # keep a few seconds for the final save
        self.total = max(self.step + 1, self.step + int(remaining / per_step))
        log.info("time budget %.0fs: %.3fs per step -> %d steps", self.budget_s, per_step, self.total)

    def run(self) -> TrainResult:
        t, main = self.cfg.train, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "run.yaml", yaml.safe_dump(asdict(self.cfg), sort_keys=False))
        for module in (self.task.model, *self.extra.values()):  # every process starts from rank 0's weights
            broadcast_state(module)
        self._t0 = time.perf_counter()
        metrics_file = open(self.out / "metrics.jsonl", "a") if main else None
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc=f"train {self.task.name}" + (f" ({self.dist.world_size} processes)" if self.dist.enabled else ""),
            unit="step",
            disable=not (t.progress and main),
            dynamic_ncols=True,
        )
        step_times: list[float] = []
        last: dict[str, float] = {}
        interrupted = False
        pool = ThreadPoolExecutor(1, thread_name_prefix="batch")
        previous_handler = _install_sigterm()
        try:
            pending = pool.submit(self.task.prepare, self.step)
            while self.total is None or self.step < self.total:
                tic = time.perf_counter()
                batch = pending.result()
                pending = pool.submit(self.task.prepare, self.step + 1)
                last = self._one_step(batch)
                self.step += 1
                step_times.append(time.perf_counter() - tic)
                if self.budget_s is not None and (
                    (self.total is None and len(step_times) == CALIBRATION_STEPS + 2)
                    or (len(step_times) in REFIT_AT and self.total is not None and 2 * self.step < self.total)
                ):
                    self._calibrate(step_times[2:][-REFIT_WINDOW:])
                    bar.total = self.total
                    bar.refresh()
                last.update(samples_per_s=t.batch_size / step_times[-1])
                bar.update(1)
                shown = {"loss": f"{last['loss']:.3f}"}
                acc = last.get("acc", last.get("i2t_acc"))  # a classifier's accuracy, or CLIP's image->text
                if acc is not None:
                    shown["acc"] = f"{acc:.2f}"
                shown["lr"] = f"{last['lr']:.1e}"
                if "temperature" in last:
                    shown["T"] = f"{last['temperature']:.4f}"
                bar.set_postfix(shown, refresh=False)
                if main and (self.step % t.log_every == 0 or self.step == self.total):
                    self._log(metrics_file, last)
                if self.step % t.save_every == 0 and self.step != self.total:
                    self.save()
                if self.budget_s is not None and self._elapsed() > self.budget_s:
                    self.total = self.step  # the budget is spent: end here, whatever the estimate said
                if self.budget_s is not None and self.dist.enabled:  # rank 0's clock decides for all
                    (total,) = self.dist.broadcast([-1 if self.total is None else self.total])
                    self.total = None if total < 0 else int(total)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
            pool.shutdown(wait=True, cancel_futures=True)
            _restore_sigterm(previous_handler)
        ckpt = self.save() if self.step > 0 else None
        if interrupted:
            raise KeyboardInterrupt(
                f"stopped at step {self.step}; checkpoint {ckpt or 'none'}. Continue with the same command and --resume"
            )
        if main:
            self.task.save_model(self.out / "model")
            self._plot()
        return TrainResult(self.out, self.step, self.step * t.batch_size, self._elapsed(), last)

    def _one_step(self, batch: Any) -> dict[str, float]:
        t = self.cfg.train
        lr = lr_at(self.step, self.total, t.lr, self.warmup(), t.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        metrics = self.task.train_step(batch, t.accum_steps, self.autocast)
        if self.dist.enabled:
            global_loss = getattr(self.task, "global_loss", False)
            sync_gradients([p for g in self.opt.param_groups for p in g["params"]], average=not global_loss)
            if not global_loss:  # each process's mean over its own samples: the global mean for the log
                metrics["loss"] = self.dist.all_sum(metrics["loss"]) / self.dist.world_size
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss became {metrics['loss']} at step {self.step}; lower --train.lr "
                f"(now {t.lr}) or keep --train.grad_clip on, and --resume from the last "
                f"checkpoint"
            )
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if t.grad_clip is not None:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
        self.opt.step()
        self.task.after_optimizer_step()
        return {**metrics, "lr": lr, **self.task.status()}

    def _log(self, f: Any, metrics: dict[str, float]) -> None:
        row = {
            "step": self.step,
            "samples": self.step * self.cfg.train.batch_size,
            "elapsed_s": round(self._elapsed(), 3),
            **{k: _round(v) for k, v in metrics.items()},
        }
        f.write(json.dumps(row) + "\n")
        f.flush()

    def _plot(self) -> None:
        try:
            from ..eval.plots import plot_training_curves

            plot_training_curves(self.out / "metrics.jsonl", self.out / "plots" / "training.png")
        except Exception as e:  # a plot must never cost the user a finished run
            log.warning("could not draw the training curves: %s", e)


def _round(v: Any) -> Any:
    return float(f"{v:.6g}") if isinstance(v, float) else v


def _install_sigterm() -> Any:
    """Treat SIGTERM like Ctrl-C, so a stopped job still writes its checkpoint."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return signal.getsignal(signal.SIGTERM)


def _restore_sigterm(handler: Any) -> None:
    with contextlib.suppress(ValueError, TypeError):
        signal.signal(signal.SIGTERM, handler)


def set_threads(threads: int | None) -> ThreadPlan:
    """Torch's threads for a run: ``threads`` if given, else ``OMP_NUM_THREADS`` if set, else every CPU this
    process may use: its affinity mask and cgroup quota (``os.cpu_count()`` counts the host's cores, and torch
    threads beyond the CPUs wait on each other at every op; see :mod:`mmfusion.utils.threads`).

    The thread that prepares the next batch gets no core of its own (``BATCH_WORKERS``): it is busy a small
    part of each step (ShapesWorld, batch 256: about 0.2 of 0.7 s), and giving it one of two cores cost torch
    more than the overlap does (clip-tiny on 2 quiet cores: 246-289 samples/s against 308-402)."""
    return configure_threads(BATCH_WORKERS, threads)
