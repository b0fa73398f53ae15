"""``mmfusion worker`` and ``mmfusion serve --no-worker`` as real processes on one real Redis: two API replicas
sharing the embedding cache, two workers with a tiny native captioner; a worker killed mid-job, a worker stopped
by SIGTERM, no worker left, a new one."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from mmfusion.models import create_model, save_model
from tests.models.test_captioner import TINY
from tests.redis_server import free_port, redis_server, redis_url  # noqa: F401 (fixtures)
from tests.utils import random_image, shapes_tokenizer

pytest.importorskip("redis")
pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Path:
    """A tiny random native captioner (about 0.2 s an image on a CPU)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cap") / "cap"
    save_model(create_model("caption-tiny", shapes_tokenizer(scenes=50), **TINY).eval(), path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from tests.utils import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _metric(url: str, prefix: str) -> float:
    lines = [x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def _data_url(seed: int) -> str:
    buf = io.BytesIO()
    random_image(32, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Procs:
    """Subprocesses of ``mmfusion``, each in a session of its own, all killed by process group at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, []

    def start(self, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log = open(self.log_dir / f"proc{len(self.procs)}.log", "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen([sys.executable, "-m", "mmfusion.cli.main", *args], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        p.log = log
        self.procs.append(p)
        return p

    def output(self, p) -> str:
        return Path(p.log.name).read_text()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            p.log.close()


def _api(procs: Procs, url: str, model: Path) -> str:
    port = free_port()
    procs.start("serve", "--redis", url, "--no-worker", "--model", str(model), "--port", str(port), "--threads", "1")
    return f"http://127.0.0.1:{port}"


def _worker(procs: Procs, url: str, captioner: Path) -> subprocess.Popen:
    return procs.start("worker", "--redis", url, "--captioner", str(captioner), "--threads", "1",
                       "--job-heartbeat-s", "0.2", "--job-stale-s", "1.5", "--grace", "10")  # fmt: skip


def _wait_ready(procs: Procs, p, words: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while words not in procs.output(p):
        assert p.poll() is None, procs.output(p)
        assert time.time() < deadline, f"not ready: {procs.output(p)}"
        time.sleep(0.1)


def _wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"{url} did not start"
        time.sleep(0.1)


def _pending(url: str) -> dict[str, int]:
    """Queue entries each worker holds unacknowledged, by the worker's pid."""
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        info = r.xpending("mmfusion:queue:caption", "workers")
        return {int(c["name"].split(":")[1]): int(c["pending"]) for c in info.get("consumers", [])}
    finally:
        r.close()


def _events(url: str, job_id: str) -> list[tuple[str, dict]]:
    out, kind = [], None
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def test_two_replicas_two_workers_a_killed_worker_and_a_stopped_one(redis_url, captioner, clip, tmp_path):  # noqa: F811
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushall()
    procs = Procs(tmp_path)
    try:
        a, b = _api(procs, redis_url, clip), _api(procs, redis_url, clip)
        w1, w2 = _worker(procs, redis_url, captioner), _worker(procs, redis_url, captioner)
        for p in (w1, w2):
            _wait_ready(procs, p, "taking caption items")
        for p, url in ((procs.procs[0], a), (procs.procs[1], b)):
            _wait_ready(procs, p, "mmfusion serving")
            _wait_healthy(url)

        # an embedding computed on A is a cache hit on B, whose model never runs for it
        texts = ["a red circle", "two blue stars"]
        on_a = httpx.post(a + "/v1/embeddings", json={"input": texts}).json()["data"]
        on_b = httpx.post(b + "/v1/embeddings", json={"input": texts}).json()["data"]
        assert [d["embedding"] for d in on_a] == [d["embedding"] for d in on_b]
        assert _metric(b, 'mmfusion_text_cache_total{result="hit"}') == 2
        assert _metric(b, 'mmfusion_batch_size_count{batcher="text"}') == 0

        images = [_data_url(i) for i in range(24)]
        job_id = httpx.post(a + "/jobs", json={"task": "caption", "images": images}).json()["id"]
        assert [j["id"] for j in httpx.get(b + "/jobs").json()["jobs"]] == [job_id]  # created on A, listed on B
        # SIGKILL a worker while it holds an item: the other takes that item once its visibility timeout is over
        while httpx.get(f"{b}/jobs/{job_id}").json()["done"] < 4 or not _pending(redis_url).get(w1.pid):
            time.sleep(0.01)
        os.killpg(w1.pid, signal.SIGKILL)
        w1.wait(10)
        held = _pending(redis_url).get(w1.pid, 0)
        events = _events(b, job_id)  # streamed on B, to the end
        assert events[-1][0] == "end" and events[-1][1]["status"] == "done"
        items = [e["item"] for k, e in events if k == "result"]
        assert sorted(items) == list(range(24))  # every item once in the stream
        assert sorted(int(i) for i in r.lrange(f"mmfusion:job:{{{job_id}}}:order", 0, -1)) == list(range(24))
        job = httpx.get(f"{a}/jobs/{job_id}").json()
        assert job["done"] == 24 and len(job["results"]) == 24 and all("caption" in x for x in job["results"])
        tries = {k: int(v) for k, v in r.hgetall(f"mmfusion:job:{{{job_id}}}").items() if k.startswith("tries:")}
        assert held <= 1 and max(tries.values()) <= 2  # its item ran at most twice, and was recorded once
        deadline = time.time() + 10
        while _pending(redis_url).get(w1.pid, 0):  # the dead worker's entry was taken over and acknowledged
            assert time.time() < deadline
            time.sleep(0.1)

        # SIGTERM: the worker finishes its item and exits 0; with no worker left, the job is never reported done
        job_id = httpx.post(b + "/jobs", json={"task": "caption", "images": images}).json()["id"]
        while httpx.get(f"{a}/jobs/{job_id}").json()["done"] < 2:
            time.sleep(0.02)
        w2.send_signal(signal.SIGTERM)
        assert w2.wait(30) == 0, procs.output(w2)
        time.sleep(2.0)
        stalled = httpx.get(f"{a}/jobs/{job_id}").json()
        assert stalled["status"] == "running" and 2 <= stalled["done"] < 24
        assert sum(_pending(redis_url).values()) == 0  # nothing held by a gone worker: the item was finished
        w3 = _worker(procs, redis_url, captioner)  # a new worker picks the job up where it was
        _wait_ready(procs, w3, "taking caption items")
        deadline = time.time() + 60
        while (job := httpx.get(f"{b}/jobs/{job_id}").json())["status"] != "done":
            assert time.time() < deadline, job
            time.sleep(0.1)
        assert len(job["results"]) == 24 and job["done"] == 24
    finally:
        procs.kill_all()
        r.close()


def test_worker_and_serve_flags_and_errors(capsys):
    from mmfusion.cli.main import main, make_parser

    args = make_parser(only="serve").parse_args(["serve", "--redis", "redis://h:6379/0", "--no-worker"])
    assert args.redis_url == "redis://h:6379/0" and args.worker is False
    argv = ["worker", "--redis", "redis://h/1", "--answerer", "a", "--grace", "5"]
    args = make_parser(only="worker").parse_args(argv)
    assert (args.redis_url, args.answerer, args.grace) == ("redis://h/1", "a", 5.0) and not hasattr(args, "port")
    assert main(["worker", "--captioner", "x"]) == 2 and "--redis" in capsys.readouterr().err
