"""Jobs on Redis: the store contract on SQLite and Redis alike, exactly-once results, take-over of a dead worker's
items, replicas sharing jobs, and a Redis restart that loses no acknowledged job. A real redis-server runs."""

import json
import time

import httpx
import pytest

from mmfusion.serve.app import create_app
from mmfusion.serve.jobs import JobStore
from mmfusion.serve.settings import ServeSettings
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401 (fixtures)
from tests.serve.conftest import run_server
from tests.serve.test_chat import data_url, noise
from tests.serve.test_jobs import MeanColour, wait_for

pytest.importorskip("redis")
pytest.importorskip("fastapi")


@pytest.fixture
def fresh(redis_url):  # noqa: F811
    """An empty Redis (the server is shared by the module's tests)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushall()
    r.close()
    return redis_url


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = JobStore(tmp_path / "jobs.sqlite")
    else:
        from mmfusion.serve.redis_jobs import RedisJobStore

        s = RedisJobStore(request.getfixturevalue("fresh"))
    yield s
    s.close()


# ---- the contract every store keeps --------------------------------------------------------------------------


def test_store_contract_create_get_list_cancel_follow(store):
    a = store.create("alice", "caption", {"task": "caption", "images": ["x", "y"]}, 2)
    time.sleep(0.01)
    b = store.create("alice", "answer", {"task": "answer", "images": ["z"], "question": "q"}, 1)
    other = store.create("bob", "caption", {"task": "caption", "images": ["x"]}, 1)
    job = store.get(a, "alice")
    assert job["status"] == "queued" and job["total"] == 2 and job["done"] == 0 and job["results"] == []
    assert job["task"] == "caption" and job["started"] is None and job["error"] is None
    assert store.get(a, "bob") is None and store.get("nope", "alice") is None  # owners see only theirs
    assert [j["id"] for j in store.list("alice")] == [b, a] and [j["id"] for j in store.list("bob")] == [other]
    assert "results" not in store.list("alice")[0]
    got, new, cursor = store.follow(a, "alice", None)
    assert got["id"] == a and new == [] and store.follow(a, "bob", None)[0] is None
    assert store.cancel(a, "bob") is None and store.get(a, "alice")["status"] == "queued"
    assert store.cancel(a, "alice") == "cancelled" and store.cancel(a, "alice") == "cancelled"
    assert store.get(a, "alice")["finished"] is not None


def _run_one(store, job_id: str, item: int, result: dict) -> bool:
    """Record one result the way each store's worker does."""
    if isinstance(store, JobStore):
        claimed = store.claim("w")
        return claimed is not None and store.add_result(job_id, "w", item, result)
    verdict, _ = store.start(job_id, item, "w")
    return verdict == "go" and store.record(job_id, item, result)


def test_store_contract_results_arrive_through_follow(store):
    job_id = store.create("", "caption", {"task": "caption", "images": ["a", "b"]}, 2)
    assert _run_one(store, job_id, 0, {"image": "a", "caption": "one"})
    job, new, cursor = store.follow(job_id, "", None)
    assert job["status"] == "running" and job["done"] == 1 and new == [(0, {"image": "a", "caption": "one"})]
    assert store.follow(job_id, "", cursor)[1] == []  # nothing new since the cursor
    if isinstance(store, JobStore):
        store.add_result(job_id, "w", 1, {"image": "b", "caption": "two"})
        store.finish(job_id, "w", "done")
    else:
        assert _run_one(store, job_id, 1, {"image": "b", "caption": "two"})
    job, new, _ = store.follow(job_id, "", cursor)
    assert job["status"] == "done" and new == [(1, {"image": "b", "caption": "two"})]
    assert [r["caption"] for r in store.get(job_id, "")["results"]] == ["one", "two"]


# ---- Redis alone: exactly once, take-over, bounded attempts ---------------------------------------------------


def test_a_retried_item_never_writes_a_second_result(fresh):
    from mmfusion.serve.redis_jobs import RedisJobStore

    store = RedisJobStore(fresh, stale_s=0.2)
    job_id = store.create("", "caption", {"task": "caption", "images": ["a", "b"]}, 2)
    first = store.take("w1", ["caption"], 100)
    assert first[2:] == (job_id, 0) and store.start(job_id, 0, "w1")[0] == "go"
    time.sleep(0.3)  # w1 went silent: past the visibility timeout its item goes to w2
    again = store.take("w2", ["caption"], 100)
    assert again[1] == first[1] and store.start(job_id, 0, "w2")[0] == "go"
    assert store.record(job_id, 0, {"caption": "from w2"}) is True
    assert store.record(job_id, 0, {"caption": "from w1, late"}) is False  # the first result stays
    assert store.start(job_id, 0, "w3")[0] == "skip"  # a result exists: a third run does nothing
    job = store.get(job_id, "")
    assert job["done"] == 1 and job["results"] == [{"caption": "from w2"}] and job["status"] == "running"
    store.close()


def test_an_item_whose_workers_keep_dying_fails_its_job_with_the_reason(fresh):
    from mmfusion.serve.redis_jobs import RedisJobStore

    store = RedisJobStore(fresh, stale_s=0.05, max_attempts=2)
    job_id = store.create("", "caption", {"task": "caption", "images": ["a"]}, 1)
    for w in ("w1", "w2"):
        got = store.take(w, ["caption"], 100)
        assert got is not None and store.start(job_id, 0, w)[0] == "go"
        time.sleep(0.1)  # ... and the worker dies
    assert store.take("w3", ["caption"], 100) is not None and store.start(job_id, 0, "w3")[0] == "failed"
    job = store.get(job_id, "")
    assert job["status"] == "failed" and "started 2 times" in job["error"] and job["done"] == 0
    assert store.record(job_id, 0, {"caption": "too late"}) is False  # never reported done
    store.close()


def test_a_heartbeat_keeps_a_slow_item_from_being_taken(fresh):
    from mmfusion.serve.redis_jobs import RedisJobStore

    store = RedisJobStore(fresh, stale_s=0.3)
    store.create("", "caption", {"task": "caption", "images": ["a"]}, 1)
    task, entry, _, _ = store.take("w1", ["caption"], 100)
    for _ in range(4):
        time.sleep(0.15)
        store.beat("w1", ["caption"], (task, entry))
    assert store.take("w2", ["caption"], 10) is None  # alive and working: nobody else takes it
    assert store.offers("caption") and not store.offers("embed")
    time.sleep(0.35)  # w1 falls silent: w2 takes the item, and w1's next beat does not take it back
    assert store.take("w2", ["caption"], 10)[1] == entry
    assert store.beat("w1", ["caption"], (task, entry)) is False and store.beat("w2", ["caption"], (task, entry))
    store.close()


# ---- replicas sharing one Redis --------------------------------------------------------------------------------


def _events(url: str, job_id: str, headers=None) -> list[tuple[str, dict]]:
    out = []
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def test_a_job_created_on_replica_a_is_listed_and_streamed_on_replica_b(fresh):
    keys = ["alice-key", "bob-key"]
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    api = create_app(ServeSettings(redis_url=fresh, worker=False, api_keys=keys))  # enqueues only, no models
    worker = create_app(ServeSettings(redis_url=fresh, api_keys=keys, job_heartbeat_s=0.2),
                        captioner=MeanColour(delay=0.05))  # fmt: skip
    images = [data_url(noise(i)) for i in range(6)]
    with run_server(worker) as b, run_server(api) as a:
        r = httpx.post(a + "/jobs", json={"task": "caption", "images": images}, headers=alice)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert [j["id"] for j in httpx.get(b + "/jobs", headers=alice).json()["jobs"]] == [job_id]
        assert httpx.get(b + "/jobs", headers=bob).json()["jobs"] == []
        assert httpx.get(f"{b}/jobs/{job_id}", headers=bob).status_code == 404  # owners hold in every replica
        assert httpx.get(f"{a}/jobs/{job_id}").status_code == 401
        events = _events(b, job_id, alice)
        results = {e["item"]: e["result"] for k, e in events if k == "result"}
        assert sorted(results) == list(range(6)) and events[-1][0] == "end" and events[-1][1]["status"] == "done"
        assert [p["done"] for k, p in events if k == "progress"][-1] == 6
        job = wait_for(a, job_id, alice)
        assert [x["caption"] for x in job["results"]] == [MeanColour().caption(noise(i))[0] for i in range(6)]
        # the API replica has no captioner; with no live worker for a task, it says what to start
        r = httpx.post(a + "/jobs", json={"task": "answer", "images": images[:1], "question": "q"}, headers=alice)
        assert r.status_code == 400 and "mmfusion worker" in r.text and "--answerer" in r.text


def test_jobs_survive_a_redis_restart_and_an_api_restart(tmp_path):
    server = RedisServer(tmp_path / "aof").start()
    try:
        settings = ServeSettings(redis_url=server.url, job_heartbeat_s=0.2, job_stale_s=2.0)
        model = MeanColour(delay=0.05)
        images = [data_url(noise(i)) for i in range(10)]
        api_app = create_app(ServeSettings(redis_url=server.url, worker=False))
        with run_server(api_app) as api, run_server(create_app(settings, captioner=model)):
            ids = [httpx.post(api + "/jobs", json={"task": "caption", "images": images}).json()["id"]
                   for _ in range(3)]  # fmt: skip
            while httpx.get(f"{api}/jobs/{ids[0]}").json()["done"] < 2:
                time.sleep(0.05)
            server.kill()  # a crash, mid-run: every acknowledged write was fsynced (appendfsync always)
            assert httpx.get(f"{api}/jobs/{ids[0]}").status_code == 503  # not an error page: retry later
            time.sleep(0.5)
            server.start()
            for job_id in ids:
                job = wait_for(api, job_id, timeout=30)
                assert job["status"] == "done" and len(job["results"]) == 10
                assert [x["caption"] for x in job["results"]] == [MeanColour().caption(noise(i))[0] for i in
                                                                  range(10)]  # fmt: skip
        with run_server(create_app(ServeSettings(redis_url=server.url, worker=False))) as again:  # a new replica
            assert {j["id"] for j in httpx.get(again + "/jobs").json()["jobs"]} == set(ids)
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_embed_jobs_give_the_models_vectors_streamed_as_events(backend, tmp_path, request):
    import numpy as np

    import mmfusion
    from tests.utils import random_image, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    extra = {"redis_url": request.getfixturevalue("fresh")} if backend == "redis" else {}
    with run_server(create_app(ServeSettings(model=str(clip), **extra))) as url:
        images = [random_image(32, i) for i in range(3)]
        r = httpx.post(url + "/jobs", json={"task": "embed", "images": [_png(im) for im in images]})
        assert r.status_code == 202, r.text
        events = _events(url, r.json()["id"])
    assert events[-1] == ("end", {**events[-1][1], "status": "done", "done": 3})
    got = {e["item"]: e["result"]["embedding"] for k, e in events if k == "result"}
    want = mmfusion.load(clip).encode_image(images).detach().numpy()
    np.testing.assert_allclose(np.array([got[i] for i in range(3)]), want, atol=1e-4)


def _png(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_stopping_worker_hands_its_item_back_at_once(fresh):
    import redis

    settings = ServeSettings(redis_url=fresh, job_heartbeat_s=0.2, job_stale_s=60.0)  # no waiting for a timeout
    slow = MeanColour(delay=1.0)
    with run_server(create_app(settings, captioner=slow)) as url:
        job_id = httpx.post(url + "/jobs", json={"task": "caption", "images": [data_url(noise(1))]}).json()["id"]
        wait_for(url, job_id, until=("running",))
    # the server stopped mid-item: the item is back in the queue, its start not counted, and another takes it
    with run_server(create_app(settings, captioner=MeanColour())) as url:
        job = wait_for(url, job_id, timeout=10)
    assert job["status"] == "done" and job["results"][0]["caption"] == MeanColour().caption(noise(1))[0]
    r = redis.Redis.from_url(fresh, decode_responses=True)
    assert r.hget(f"mmfusion:job:{{{job_id}}}", "tries:0") == "1" and r.xlen("mmfusion:queue:caption") == 0
    r.close()


class Broken(MeanColour):
    def caption(self, images, prompt=None, **options):
        raise RuntimeError("a bug in the model")


def test_a_broken_model_gives_its_images_the_reason_and_the_job_ends(fresh):
    with run_server(create_app(ServeSettings(redis_url=fresh), captioner=Broken())) as url:
        job_id = httpx.post(url + "/jobs", json={"task": "caption", "images": [data_url(noise(1))] * 2}).json()["id"]
        job = wait_for(url, job_id, timeout=10)
    assert job["status"] == "done" and [r["image"] for r in job["results"]] == ["images[0]", "images[1]"]
    assert all("RuntimeError" in r["error"] and "a bug" not in r["error"] for r in job["results"])
