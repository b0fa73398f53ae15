"""Thread sizing (mmfusion.utils.threads): cgroup quotas read from fake files, the torch / worker split, and the
trainer's use of it.

This folder has no ``__init__.py`` on purpose: a package ``tests.utils`` would shadow the shared helpers in
``tests/utils.py``, which a plain folder does not (a module wins over a namespace package)."""

import os
from pathlib import Path

import pytest
import torch

from mmfusion.train.trainer import set_threads
from mmfusion.utils import threads
from mmfusion.utils.threads import cgroup_cpu_limit, configure_threads, plan_threads, usable_cpus, user_threads


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_quota_of_a_container(tmp_path):
    root = tmp_path / "cg"
    _write(root, "cpu.max", "150000 100000")  # the container's own cgroup, mounted at the root (cgroup namespace)
    assert cgroup_cpu_limit(root, _proc(tmp_path, "0::/\n")) == pytest.approx(1.5)


def test_cgroup_v2_no_quota_and_no_cgroups(tmp_path):
    root = tmp_path / "cg"
    _write(root, "cpu.max", "max 100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "0::/\n")) is None
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing-proc") is None


def test_cgroup_v2_smallest_quota_along_the_path(tmp_path):
    """A quota on an ancestor limits the process too; the path /proc names is followed down from the mount."""
    root = tmp_path / "cg"
    _write(root, "kubepods/cpu.max", "400000 100000")
    _write(root, "kubepods/pod1/cpu.max", "200000 100000")
    _write(root, "kubepods/pod1/box/cpu.max", "max 100000")
    _write(root, "other/cpu.max", "50000 100000")  # another cgroup: not ours
    assert cgroup_cpu_limit(root, _proc(tmp_path, "0::/kubepods/pod1/box\n")) == pytest.approx(2.0)


def test_cgroup_v2_path_missing_under_the_mount(tmp_path):
    """In a container, /proc may name the host's path while the mount is the container's cgroup itself."""
    root = tmp_path / "cg"
    _write(root, "cpu.max", "300000 100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "0::/docker/abc123\n")) == pytest.approx(3.0)


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cg"
    _write(root, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000")
    _write(root, "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    _write(root, "cpu,cpuacct/cpu.cfs_quota_us", "-1")  # the root: no limit
    _write(root, "cpu,cpuacct/cpu.cfs_period_us", "100000")
    proc = _proc(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(2.5)


def test_cgroup_v1_unlimited_and_garbage(tmp_path):
    root = tmp_path / "cg"
    _write(root, "cpu/cpu.cfs_quota_us", "-1")
    _write(root, "cpu/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "1:cpu:/\n")) is None
    _write(root, "cpu/cpu.cfs_quota_us", "lots")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "1:cpu:/\n")) is None
    _write(root, "cpu.max", "garbage")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "not a cgroup line\n")) is None


def test_cgroup_hybrid_unified_mount(tmp_path):
    root = tmp_path / "cg"
    _write(root, "unified/cpu.max", "100000 100000")
    _write(root, "cpu/cpu.cfs_quota_us", "-1")
    _write(root, "cpu/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "1:cpu:/\n0::/\n")) == pytest.approx(1.0)


def test_usable_cpus_is_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 16)
    proc = _proc(tmp_path, "0::/\n")
    assert usable_cpus(root, proc) == 16  # no quota
    _write(root, "cpu.max", "250000 100000")
    assert usable_cpus(root, proc) == 2  # 2.5 CPUs keep two threads busy, not three
    _write(root, "cpu.max", "50000 100000")
    assert usable_cpus(root, proc) == 1  # half a CPU is still one thread
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 1)
    _write(root, "cpu.max", "400000 100000")
    assert usable_cpus(root, proc) == 1  # the affinity mask is the smaller


def test_usable_cpus_on_this_machine():
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_user_threads_reads_omp_num_threads():
    assert user_threads({}) is None
    assert user_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert user_threads({"OMP_NUM_THREADS": "4,2"}) == 4  # nested levels: the outer one
    for bad in ("", "0", "-2", "many"):
        assert user_threads({"OMP_NUM_THREADS": bad}) is None


@pytest.mark.parametrize("cpus", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("workers", [None, 0, 1, 2, 3, 7, 100])
def test_split_never_exceeds_the_cpus(cpus, workers):
    plan = plan_threads(workers, cpus=cpus, env={})
    assert plan.torch_threads >= 1 and plan.workers >= 0 and plan.cpus == cpus
    assert plan.torch_threads + plan.workers <= cpus
    if workers:
        assert plan.workers >= 1
    if workers == 0:
        assert plan.torch_threads == cpus  # nothing beside torch: every CPU to it


def test_split_values():
    assert plan_threads(cpus=2, env={}) == (1, 1, 2)  # by default half and half
    assert plan_threads(cpus=7, env={}) == (4, 3, 7)  # torch takes the odd CPU
    assert plan_threads(2, cpus=16, env={}) == (14, 2, 16)
    assert plan_threads(100, cpus=16, env={}) == (1, 15, 16)  # torch keeps one
    torch_threads, workers, _ = plan_threads(None, cpus=1, env={})  # one CPU: neither can be zero
    assert (torch_threads, workers) == (1, 1)


def test_split_keeps_the_users_torch_threads():
    assert plan_threads(cpus=16, env={"OMP_NUM_THREADS": "1"}) == (1, 8, 16)  # decoders still get their half
    assert plan_threads(20, cpus=16, env={"OMP_NUM_THREADS": "4"}) == (4, 12, 16)  # workers get what is left
    assert plan_threads(2, cpus=2, env={"OMP_NUM_THREADS": "2"}) == (2, 1, 2)  # the user's choice, kept
    assert plan_threads(0, torch_threads=3, cpus=2, env={"OMP_NUM_THREADS": "1"}) == (3, 0, 2)  # argument first


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_sets_torch_threads_once(restore_torch_threads, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    plan = configure_threads(workers=1, env={})
    assert plan == (1, 1, 2) and torch.get_num_threads() == 1
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert configure_threads(workers=1, env={}) == plan and calls == []  # already so: left alone
    configure_threads(workers=0, torch_threads=3, env={})
    assert calls == [3]


def test_trainer_gives_torch_every_usable_cpu(restore_torch_threads, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_threads(None) == (2, 0, 2) and torch.get_num_threads() == 2  # the batch prefetch takes no core
    assert set_threads(1).torch_threads == 1 and torch.get_num_threads() == 1  # --train.threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert set_threads(None).torch_threads == 1 and torch.get_num_threads() == 1  # the user's OMP_NUM_THREADS
