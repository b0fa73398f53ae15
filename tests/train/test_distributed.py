"""Training in 2 processes (torchrun, gloo on CPU) is the same run as in 1: the same weights after the same
steps, a resume may change the number of processes, and a process that dies ends the job."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.utils import TINY_OVERRIDES

ARGS = ["train", "clip", *(f"--{o}" for o in TINY_OVERRIDES), "--data.tokenizer_captions=200",
        "--train.batch_size=8", "--train.progress=false", "--train.warmup_steps=2", "--train.log_every=1",
        "--train.captions_per_image=2", "--train.positives=caption"]  # fmt: skip


def train(out: Path, *extra: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmfusion", *ARGS, "--out", str(out), *extra]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else ["--train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(run: Path) -> dict:
    return load_file(glob.glob(str(run / "model" / "*.safetensors"))[0])


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(out, "--steps", "5")
    return out


def test_two_processes_reach_the_weights_of_one(one_process, tmp_path):
    """Two captions per image and caption positives: the mask spans both processes' slices."""
    train(tmp_path / "two", "--steps", "5", nproc=2)
    assert max_diff(one_process, tmp_path / "two") < 1e-4
    log = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # one writer: no line twice
    assert [round(r["loss"], 4) for r in log] == [round(r["loss"], 4) for r in ref]
    assert not (tmp_path / "two" / "eval").exists() or (tmp_path / "two" / "eval").is_dir()


def test_a_resume_may_change_the_number_of_processes(tmp_path):
    """3 steps, then extended to 5 with --resume: in 1 process throughout, and in 2 then 1."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(ref, "--steps", "3")
    train(ref, "--steps", "5", "--resume")
    train(out, "--steps", "3", nproc=2)
    train(out, "--steps", "5", "--resume")  # the data position is the step: the same pairs come next
    assert max_diff(ref, out) < 1e-4


def test_the_global_batch_must_divide_among_the_processes(tmp_path):
    done = train(tmp_path / "odd", "--steps", "2", "--train.batch_size=9", nproc=2, check=False)
    assert done.returncode == 2 and "divisible by --nproc 2" in done.stderr


def test_a_process_that_dies_ends_the_job(tmp_path):
    cmd = [sys.executable, "-m", "mmfusion", *ARGS, "--out", str(tmp_path / "run"), "--steps", "100000",
           "--nproc", "2"]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while (
            not (tmp_path / "run" / "metrics.jsonl").is_file()
            or not (tmp_path / "run" / "metrics.jsonl").stat().st_size
        ):
            assert time.time() < deadline and job.poll() is None, "the job did not start training"
            time.sleep(0.2)
        workers = _workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        t0 = time.time()
        code = job.wait(timeout=60)
        assert code != 0 and time.time() - t0 < 30
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def _workers(pid: int) -> list[int]:
    """The training processes under the launcher: the leaves of the process tree below ``pid``."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    leaves, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = children.get(p, [])
        if not kids and p != pid:
            leaves.append(p)
        todo += kids
    return sorted(leaves)


def test_the_gradient_cache_keeps_every_negative_across_processes(one_process, tmp_path):
    """2 processes x 2 micro-batches each: still one step over the whole global batch."""
    train(tmp_path / "accum", "--steps", "5", "--train.accum_steps=2", nproc=2)
    assert max_diff(one_process, tmp_path / "accum") < 1e-4
