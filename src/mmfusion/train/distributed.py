"""Training in several processes with torch.distributed, on one machine or many, launched by ``torchrun``.

``torchrun`` (PyTorch's elastic launcher) starts one process per GPU or CPU share and tells each its ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` joins them in a process group (gloo on CPU, nccl on CUDA).
Then every process:

- holds the same model (rank 0's weights are broadcast at the start, and after a resume);
- takes its slice of each step's *global* batch (positions ``step * B + rank * B / N`` on), so step t sees the
  same samples whatever N is;
- back-propagates its share of the loss (contrastive losses over the global batch: see
  :mod:`mmfusion.modules.global_losses`) and then sums or averages the gradients of all processes in one
  all-reduce of a flat buffer (:func:`sync_gradients`), so the optimiser steps agree exactly;
- agrees with rank 0 on when to stop (:meth:`DistContext.broadcast`): rank 0 alone measures the time budget.

Only rank 0 writes checkpoints, metrics, plots and the final model. Gradients are synced by the trainer after
each step rather than by ``DistributedDataParallel``'s hooks: CLIP's gradient cache embeds a batch twice and
calls the towers apart, which DDP's one-forward-one-backward contract does not allow; one all-reduce per step
of all gradients together costs the same bytes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every process (a no-op in one process)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.broadcast(t, 0)
        return t.tolist()

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t)

    def shard(self, batch_size: int) -> tuple[int, int]:
        """(offset, size) of this process's slice of a global batch of ``batch_size``."""
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size {batch_size} (the global batch) must be divisible by the "
                             f"{self.world_size} processes; each takes batch_size / processes")  # fmt: skip
        part = batch_size // self.world_size
        return self.rank * part, part


def from_env() -> DistContext:
    """The context torchrun's environment describes (one process when it says nothing)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                       int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))  # fmt: skip


def setup(device: str = "auto", backend: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join the process group torchrun set up (nothing to do in one process).

    Args:
        device: the run's device setting; ``cuda`` (or ``auto`` with GPUs) gives each process its own GPU.
        backend: ``gloo`` or ``nccl``; default nccl with CUDA, else gloo.
        timeout_s: how long a collective may wait for a silent process before failing.
    """
    ctx = from_env()
    if not ctx.enabled or dist.is_initialized():
        return ctx
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    backend = backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d (%s)", ctx.rank, ctx.world_size, backend)
    return ctx


def device_for(ctx: DistContext, name: str) -> str:
    """The device of this process: its own GPU (``cuda:LOCAL_RANK``) when the run uses CUDA."""
    if not ctx.enabled:
        return name
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        return f"cuda:{ctx.local_rank}"
    return name


def teardown(finished: bool = False) -> None:
    """Leave the process group. ``finished`` (every process ended its work normally): first wait for the
    others, so that no process closes its connections while a peer still runs (rank 0 writes the model and
    plots after the last step); a gloo process tearing down ahead of its peers was seen to abort in CI.
    After a failure there is no waiting: the peer may be gone, and the launcher ends the job."""
    if not dist.is_initialized():
        return
    try:
        if finished:
            dist.barrier()  # bounded by the group's timeout (rank 0 may still be evaluating): then leave anyway
    except RuntimeError as e:
        log.warning("leaving the process group without waiting for the others: %s", e)
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_state(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every process."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def sync_gradients(params: list[torch.nn.Parameter], average: bool) -> None:
    """Sum (``average=False``: each process back-propagated its share of a global loss) or average (each
    process's loss is the mean over its own samples, the shards being equal) the gradients of every process,
    in one all-reduce. A parameter without a gradient on some process counts as zero there."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)
