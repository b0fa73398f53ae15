"""Two replicas (`mmfusion serve --snapshots` subprocesses) and one writer (`mmfusion index --publish`): an image
indexed after the replicas started is found by both within 5 s, and a client searching throughout never fails."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mmfusion.index import Index
from mmfusion.index.snapshots import publish
from tests.redis_server import redis_server, redis_url  # noqa: F401 (fixtures: a real redis-server)
from tests.serve.conftest import free_port
from tests.utils import photo, tiny_clip

httpx = pytest.importorskip("httpx")


def start_replica(db, log, redis: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    poll = ["--snapshot-poll-s", "0.5"] if redis is None else ["--snapshot-poll-s", "60", "--redis", redis]
    argv = [sys.executable, "-m", "mmfusion", "serve", "--db", str(db), "--snapshots", *poll, "--port", str(port),
            "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, base: str, log_path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the replica did not start in 90 s"
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def find_new(base: str) -> list:
    r = httpx.post(f"{base}/search", json={"text": "a photo", "path": "late_arrival", "k": 1}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["results"]


@pytest.mark.parametrize("announced", [False, True], ids=["polled", "redis"])
def test_an_image_indexed_after_the_replicas_started_is_found_by_both(tmp_path, request, announced):
    """Polled every 0.5 s, or polled every 60 s with Redis announcements: found within 5 s either way."""
    redis = request.getfixturevalue("redis_url") if announced else None
    model = tiny_clip(tmp_path / "clip")
    for i in range(6):
        photo(tmp_path / "photos" / f"p{i}.png", seed=i)
    with Index.open(tmp_path / "db", model=model, write=True) as ix:
        ix.update([tmp_path / "photos"], progress=False)
        publish(ix)
    procs, bases = [], []
    stop, failures, done = threading.Event(), [], [0]

    def client() -> None:  # searches in a loop on both replicas, thumbnails included, during the swap
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                for base in bases:
                    try:
                        r = c.post(f"{base}/search", json={"text": "a red circle", "k": 3})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 3
                        if ok:
                            r = c.get(f"{base}/thumbs/{r.json()['results'][0]['id']}")
                            ok = r.status_code == 200
                        if not ok:
                            failures.append((base, r.status_code, r.text[:200]))
                    except httpx.HTTPError as e:
                        failures.append((base, type(e).__name__, str(e)))
                    done[0] += 1

    logs = [tmp_path / f"replica{i}.log" for i in range(2)]
    try:
        for log in logs:
            proc, base = start_replica(tmp_path / "db", open(log, "wb"), redis)
            procs.append(proc)
            bases.append(base)
        for proc, base, log in zip(procs, bases, logs):
            wait_up(proc, base, log)
        assert all(find_new(b) == [] for b in bases)
        assert {httpx.get(f"{b}/healthz").json()["index_version"] for b in bases} == {1}
        loop = threading.Thread(target=client, daemon=True)
        loop.start()
        time.sleep(0.5)
        photo(tmp_path / "photos" / "late_arrival.png", seed=99)
        writer = subprocess.run([sys.executable, "-m", "mmfusion", "-q", "index", str(tmp_path / "photos"),
                                 "--db", str(tmp_path / "db"), "--publish", *(["--redis", redis] if redis else [])],
                                capture_output=True, text=True,
                                timeout=120, start_new_session=True)  # fmt: skip
        published = time.monotonic()  # the pointer switched before the writer exited
        before = done[0]
        assert writer.returncode == 0, writer.stderr[-3000:]
        assert "published snapshot v2" in writer.stderr
        found = {}
        while len(found) < 2:
            assert time.monotonic() - published < 5, f"found by {sorted(found)} only, 5 s after publishing"
            for b in bases:
                if b not in found and (hits := find_new(b)):
                    found[b] = hits[0]
            time.sleep(0.05)
        assert len({h["id"] for h in found.values()}) == 1  # the same row on both: one index
        for b, h in found.items():
            assert httpx.get(f"{b}{h['image_url']}").status_code == 200
            assert httpx.get(f"{b}/healthz").json()["index_version"] == 2
        time.sleep(0.5)  # searching on after the swap
        stop.set()
        loop.join(timeout=30)
        assert failures == [], failures[:5]
        assert before >= 4 and done[0] >= before + 10, f"{before} requests before the swap, {done[0]} in all"
    finally:
        stop.set()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
