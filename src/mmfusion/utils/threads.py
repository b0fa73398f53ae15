"""How many CPUs this process may keep busy, and one split of them between torch and worker threads.

Torch on a CPU runs each parallel op on a team of OpenMP threads that meet at a barrier when the op ends; a
thread that the scheduler has set aside holds the whole team up, and the waiting threads spin, taking CPU
from the ones with work left: every parallel op pays, however small (AdamW's ``sqrt`` of each parameter went
from 1 to 96 ms a step). So a process with more busy threads than CPUs slows down far more than its share: on
a 2-core machine kept busy by two other processes, a CLIP training step (clip-tiny, batch 256) ran 1.4x to 5.7x
faster with one torch thread than with two (206 vs 143, 233 vs 41 samples/s), and indexing 400 images took
4.3 s with ``OMP_NUM_THREADS=1`` against 24.6 s with torch's two threads beside the decoding threads. Two rules:

- Count the CPUs the process may actually use (:func:`usable_cpus`): its affinity mask and its cgroup's CPU
  quota. ``os.cpu_count()`` gives the host's cores: 64 in a container limited to 2 CPUs.
- When threads of the same process work steadily beside torch (decoding images while the model embeds), give
  them cores of their own and torch the rest, so that the two never add up to more than the CPUs
  (:func:`plan_threads`). A thread that is busy a small part of the time (a trainer preparing the next batch)
  does not need one: taking a core from torch for it costs more than the overlap (the trainer's loop on
  2 quiet cores: 308 to 402 samples/s with two torch threads beside it, 246 to 289 with one).

A torch thread count the user chose (``--threads``, ``OMP_NUM_THREADS``) is kept as given. One call, at the
start of a command, applies the plan: :func:`configure_threads`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
V1_CPU_DIRS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")  # where cgroup v1 mounts the cpu controller


class ThreadPlan(NamedTuple):
    """How a process spends its CPUs; unpacks as ``torch_threads, workers = plan_threads(...)``."""

    torch_threads: int  # torch's intra-op threads
    workers: int  # threads that work beside torch: image decoding, data preparation
    cpus: int  # the CPUs the plan was made for


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``taskset``, cpusets); all of them where the OS has no masks."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _v2_quota(text: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000": quota and period in us)."""
    parts = (text or "").split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(quota: str | None, period: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1: no limit)."""
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """This process's cgroup per controller from ``/proc/self/cgroup`` lines ``id:controllers:path``; the cgroup
    v2 (unified) path under the key ``""``."""
    out: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


def _up_to(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory under ``mount`` and each of its parents up to ``mount``: a quota set on an ancestor
    limits its descendants too. Inside a container the mount is often the container's own cgroup, while
    ``/proc/self/cgroup`` names its path on the host: the parts that do not exist are skipped."""
    dirs, d = [], mount / path.strip("/")
    while d != mount and mount in d.parents:
        dirs.append(d)
        d = d.parent
    return [*dirs, mount]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs this process's cgroups allow (quota / period, the smallest along its cgroup and their parents), from
    cgroup v2 ``cpu.max`` (mounted at ``root`` or, on hybrid systems, ``root/unified``) and cgroup v1
    ``cpu.cfs_quota_us``; None where no quota is set or there are no cgroups.

    Args:
        root: where cgroups are mounted; a test passes a folder of fake files.
        proc_cgroup: the file that names this process's cgroups.
    """
    own = _own_cgroups(proc_cgroup)
    limits: list[float] = []
    for mount in (root, root / "unified"):
        for d in _up_to(mount, own.get("", "/")):
            limits.append(_v2_quota(_read(d / "cpu.max")) or math.inf)
    for name in V1_CPU_DIRS:
        mount = root / name
        if mount.is_dir():
            for d in _up_to(mount, own.get("cpu", "/")):
                limits.append(_v1_quota(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")) or math.inf)
    found = min(limits, default=math.inf)
    return None if math.isinf(found) else found


def user_threads(env: Mapping[str, str] | None = None) -> int | None:
    """The torch thread count the user set with ``OMP_NUM_THREADS`` (its first value, as OpenMP reads
    "4,2"); None when it is unset or not a positive number."""
    text = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may keep busy: its affinity mask, capped by its cgroup's CPU quota (rounded down, at
    least 1: a quota of 1.5 CPUs keeps one thread busy without throttling, two threads would be throttled).

    ``OMP_NUM_THREADS`` is not a cap here: it says how many threads torch runs, and :func:`plan_threads`
    keeps it so, while decoding threads may still use the other CPUs (``OMP_NUM_THREADS=1``, the usual cure
    for oversubscription, must not leave an indexer one decoding thread on 16 cores).
    """
    n = affinity_cpus()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    return min(n, max(1, math.floor(quota))) if quota is not None else n


def plan_threads(
    workers: int | None = None,
    torch_threads: int | None = None,
    cpus: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ThreadPlan:
    """Split the usable CPUs between torch's intra-op threads and ``workers`` threads that run beside it.

    The sum never exceeds the CPUs, except on one CPU (one thread of each: neither can be zero) and where the
    user chose the torch threads. Torch keeps at least one CPU; workers get what they ask for up to the rest.

    Args:
        workers: worker threads wanted (decoding, data preparation) that work *steadily* while torch computes;
            None: half the CPUs (rounded down, at least one), torch the other half. 0: torch takes every CPU.
        torch_threads: the user's choice (a ``--threads`` flag); else ``OMP_NUM_THREADS`` if set; else planned.
        cpus: the CPUs to split; default :func:`usable_cpus`.
        env: the environment to read (default ``os.environ``).

    Returns:
        ``(torch_threads, workers, cpus)``. With a user-chosen torch count, workers get the CPUs left over,
        at least one if any were asked for.
    """
    cpus = max(1, cpus or usable_cpus())
    wanted = max(1, cpus // 2) if workers is None else max(0, workers)
    chosen = torch_threads or user_threads(env)
    if chosen:
        return ThreadPlan(chosen, min(wanted, max(1 if wanted else 0, cpus - chosen)), cpus)
    given = min(wanted, max(1 if wanted else 0, cpus - 1))
    return ThreadPlan(max(1, cpus - given), given, cpus)


def configure_threads(
    workers: int | None = None, torch_threads: int | None = None, env: Mapping[str, str] | None = None
) -> ThreadPlan:
    """Plan the threads (:func:`plan_threads`) and set torch's intra-op thread count to the plan; call it once,
    where a command starts, and size the worker pools from ``plan.workers``.

    A torch count the user chose (the argument or ``OMP_NUM_THREADS``) is applied as given; torch's count is
    changed only when it differs (``torch.set_num_threads`` is cheap, but a change resizes the OpenMP team).
    """
    import torch

    plan = plan_threads(workers, torch_threads, env=env)
    if torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    log.debug("threads: %d for torch, %d workers, of %d CPUs", plan.torch_threads, plan.workers, plan.cpus)
    return plan
