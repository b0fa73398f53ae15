"""Jobs: captions and answers for many images, kept in SQLite, private to their key, restart-safe."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mmfusion.serve.app import create_app
from mmfusion.serve.jobs import JobStore
from mmfusion.serve.settings import ServeSettings
from tests.serve.conftest import free_port, run_server
from tests.serve.test_chat import data_url, noise

pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parents[2]


class MeanColour:
    """A captioner and answerer that says an image's mean colour (deterministic), optionally slowly."""

    name = "mean-colour"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0

    def _say(self, image: Image.Image) -> str:
        time.sleep(self.delay)
        self.calls += 1
        return "mean " + " ".join(str(int(v)) for v in np.asarray(image.convert("RGB")).reshape(-1, 3).mean(0))

    def caption(self, images, prompt=None, **options):
        return [self._say(im) for im in (images if isinstance(images, list) else [images])]

    def answer(self, images, questions, **options):
        return [f"{questions}: {self._say(images)}"]


def wait_for(url: str, job_id: str, headers=None, until=("done", "failed", "cancelled"), timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", headers=headers).json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {until}: {job}")


def test_caption_job_over_indexed_ids_and_data_urls_reports_broken_items(served):
    _, db = served
    model = MeanColour()
    app = create_app(ServeSettings(db=str(db)), captioner=model)
    with run_server(app) as url:
        ids = [h["id"] for h in httpx.post(url + "/search", json={"text": "a shape", "k": 3}).json()["results"]]
        images = [ids[0], f"mmfusion://images/{ids[1]}", data_url(noise(1)), "data:image/png;base64,AAAA", ids[2]]
        r = httpx.post(url + "/jobs", json={"task": "caption", "images": images})
        assert r.status_code == 202 and r.json()["total"] == 5
        job = wait_for(url, r.json()["id"])
        assert job["status"] == "done" and job["done"] == 5 and job["started"] and job["finished"]
        res = job["results"]
        assert [x["image"] for x in res] == [f"mmfusion://images/{i}" for i in ids[:2]] + [
            "images[2]", "images[3]", f"mmfusion://images/{ids[2]}"]  # fmt: skip
        for i, x in zip((0, 1, 4), (res[0], res[1], res[4]), strict=True):
            original = Image.open(io.BytesIO(httpx.get(f"{url}/images/{ids[min(i, 2)]}").content))
            assert x["caption"] == MeanColour().caption(original)[0]
        assert res[2]["caption"] == MeanColour().caption(noise(1))[0]
        assert "error" in res[3] and "caption" not in res[3] and "image" in res[3]["error"]
        assert httpx.get(url + "/jobs").json()["jobs"][0]["id"] == job["id"]


def test_answer_jobs_take_one_question_or_one_per_image():
    app = create_app(ServeSettings(), answerer=MeanColour())
    imgs = [data_url(noise(2)), data_url(noise(3))]
    with run_server(app) as url:
        one = httpx.post(url + "/jobs", json={"task": "answer", "images": imgs, "question": "colour?"}).json()
        each = httpx.post(url + "/jobs", json={"task": "answer", "images": imgs, "questions": ["a?", "b?"]}).json()
        assert [x["question"] for x in wait_for(url, one["id"])["results"]] == ["colour?", "colour?"]
        res = wait_for(url, each["id"])["results"]
        assert [x["question"] for x in res] == ["a?", "b?"] and res[1]["answer"].startswith("b?: mean")
        for body, words in [
            ({"task": "answer", "images": imgs}, "exactly one of question"),
            ({"task": "answer", "images": imgs, "questions": ["a?"]}, "1 questions for 2 images"),
            ({"task": "caption", "images": imgs}, "--captioner"),
            ({"task": "answer", "images": ["/etc/passwd"], "question": "q"}, "paths are not read"),
            ({"task": "answer", "images": ["http://10.0.0.1/x.png"], "question": "q"}, "does not fetch URLs"),
            ({"task": "answer", "images": imgs, "question": "q", "max_tokens": 10**6}, "limit"),
        ]:
            r = httpx.post(url + "/jobs", json=body)
            assert r.status_code == 400 and words in r.text, (body, r.text)


def test_a_job_is_visible_only_to_the_key_that_made_it():
    app = create_app(ServeSettings(api_keys=["alice-key", "bob-key"]), captioner=MeanColour())
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    with run_server(app) as url:
        job_id = httpx.post(url + "/jobs", json={"task": "caption", "images": [data_url(noise(4))]},
                            headers=alice).json()["id"]  # fmt: skip
        assert wait_for(url, job_id, alice)["status"] == "done"
        assert httpx.get(f"{url}/jobs/{job_id}", headers=bob).status_code == 404
        assert httpx.delete(f"{url}/jobs/{job_id}", headers=bob).status_code == 404
        assert httpx.get(url + "/jobs", headers=bob).json()["jobs"] == []
        assert httpx.get(f"{url}/jobs/{job_id}").status_code == 401
        assert [j["id"] for j in httpx.get(url + "/jobs", headers=alice).json()["jobs"]] == [job_id]


def test_cancel_stops_a_running_job_and_keeps_its_results():
    model = MeanColour(delay=0.1)
    app = create_app(ServeSettings(), captioner=model)
    with run_server(app) as url:
        job_id = httpx.post(url + "/jobs", json={"task": "caption", "images": [data_url(noise(5))] * 40}).json()["id"]
        wait_for(url, job_id, until=("running",))
        while httpx.get(f"{url}/jobs/{job_id}").json()["done"] < 2:
            time.sleep(0.05)
        assert httpx.delete(f"{url}/jobs/{job_id}").json()["status"] == "cancelled"
        time.sleep(0.5)
        job = httpx.get(f"{url}/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and 2 <= job["done"] < 40 and len(job["results"]) == job["done"]
        assert model.calls <= job["done"] + 1  # at most the item in flight when it was cancelled


def test_a_clean_stop_requeues_the_job_and_the_next_service_continues_it(tmp_path):
    jobs_db = tmp_path / "jobs.sqlite"
    first = MeanColour(delay=0.1)
    images = [data_url(noise(i)) for i in range(12)]
    with run_server(create_app(ServeSettings(jobs_db=str(jobs_db)), captioner=first)) as url:
        job_id = httpx.post(url + "/jobs", json={"task": "caption", "images": images}).json()["id"]
        while httpx.get(f"{url}/jobs/{job_id}").json()["done"] < 3:
            time.sleep(0.05)
    assert JobStore(jobs_db).get(job_id, "")["status"] == "queued"
    second = MeanColour()
    with run_server(create_app(ServeSettings(jobs_db=str(jobs_db)), captioner=second)) as url:
        job = wait_for(url, job_id)
    assert job["status"] == "done" and [x["caption"] for x in job["results"]] == [
        MeanColour().caption(noise(i))[0] for i in range(12)]  # fmt: skip
    assert first.calls + second.calls <= 12 + 1 and second.calls < 12  # continued, not started over


SERVER = """
import sys, uvicorn
from mmfusion.serve.app import create_app
from mmfusion.serve.settings import ServeSettings
from tests.serve.test_jobs import MeanColour
app = create_app(ServeSettings(jobs_db=sys.argv[1], job_heartbeat_s=0.2), captioner=MeanColour(delay=0.2))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_a_killed_worker_leaves_its_job_failed_never_running(tmp_path):
    jobs_db, port = tmp_path / "jobs.sqlite", free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(jobs_db), str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url + "/healthz")
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, "the job server did not start"
                time.sleep(0.1)
        body = {"task": "caption", "images": [data_url(noise(i)) for i in range(30)]}
        running = httpx.post(url + "/jobs", json=body).json()["id"]
        queued = httpx.post(url + "/jobs", json={"task": "caption", "images": [data_url(noise(0))]}).json()["id"]
        while httpx.get(f"{url}/jobs/{running}").json()["done"] < 2:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert JobStore(jobs_db).get(running, "")["status"] == "running"  # as the dead worker left it
    settings = ServeSettings(jobs_db=str(jobs_db), job_heartbeat_s=0.1, job_stale_s=1.0)
    with run_server(create_app(settings, captioner=MeanColour())) as url:
        dead = wait_for(url, running, until=("failed",), timeout=10)
        assert "worker running this job stopped" in dead["error"] and dead["done"] >= 2
        assert len(dead["results"]) == dead["done"]  # what was finished is kept
        assert wait_for(url, queued)["status"] == "done"  # the queued one runs on the new service
