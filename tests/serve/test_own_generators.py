"""mmfusion's own captioner, generative VQA model and VQA classifier behind the service, loaded from their runs as
`mmfusion serve --captioner RUN --answerer RUN` loads them: chat completions (streamed or not), /v1/models,
/healthz and the caption and answer jobs (SQLite and Redis). Random weights say arbitrary words, so each answer is
compared with the same run's own greedy call on the same image."""

import asyncio
import json
import time

import pytest

import mmfusion
from mmfusion.serve.app import create_app
from mmfusion.serve.service import Service
from mmfusion.serve.settings import ServeSettings
from tests.redis_server import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.serve.test_chat import data_url, noise
from tests.tiny_generators import ANSWERS, tiny_generators

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tests.utils import one_thread  # noqa: E402, F401  (autouse: one torch thread)

MAX_NEW = 12  # the service's --max-new-tokens in these tests
QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_generators(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="module")
def direct(runs):
    """The runs loaded apart from the service: what each surface must agree with."""
    return {k: mmfusion.load(str(p), device="cpu") for k, p in runs.items()}


def serve(runs, captioner: str | None, answerer: str | None, **settings) -> TestClient:
    s = ServeSettings(captioner=captioner and str(runs[captioner]), answerer=answerer and str(runs[answerer]),
                      max_new_tokens=MAX_NEW, **settings)  # fmt: skip
    return TestClient(create_app(s), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def generative(runs):
    """A captioner run and a generative VQA run of the same preset (caption-tiny), as the demo serves them."""
    with serve(runs, "caption", "genvqa") as c:
        yield c


@pytest.fixture(scope="module")
def classifier(runs):
    with serve(runs, "caption", "vqa") as c:
        yield c


def chat(text: str | None, *images, **fields) -> dict:
    parts = ([{"type": "text", "text": text}] if text is not None else []) + [
        {"type": "image_url", "image_url": {"url": data_url(im)}} for im in images
    ]
    return {"messages": [{"role": "user", "content": parts}], **fields}


def streamed(client: TestClient, body: dict) -> tuple[str, list[dict]]:
    """The joined text of a streamed completion and its events (the last line must be data: [DONE])."""
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "error" not in events[-1], events[-1]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    return text, events


def test_models_and_healthz_name_each_role_apart(generative, classifier):
    ids = {m["id"]: m["role"] for m in generative.get("/v1/models").json()["data"]}
    # two caption-tiny runs: each gets an id of its own, so a request can name either
    assert ids == {"caption-tiny:captioner": "captioner", "caption-tiny:answerer": "answerer"}
    health = generative.get("/healthz").json()  # the page shows its caption and ask panels from these
    assert health["captioner"] == "caption-tiny:captioner" and health["answerer"] == "caption-tiny:answerer"
    ids = {m["id"]: m["role"] for m in classifier.get("/v1/models").json()["data"]}
    assert ids == {"caption-tiny": "captioner", "vqa-tiny": "answerer"}


def test_caption_equals_the_runs_own_greedy_caption_streamed_or_not(generative, direct):
    img = noise(10)
    want = direct["caption"].caption([img], max_new_tokens=MAX_NEW)[0]
    health = generative.get("/healthz").json()
    for body in (chat(None, img), chat(None, img, model=health["captioner"])):  # by default, and by its id
        out = generative.post("/v1/chat/completions", json=body).json()
        assert out["choices"][0]["message"]["content"] == want and want
        assert out["model"] == "caption-tiny:captioner"
        usage = out["usage"]  # counted by the run's own tokenizer, not as one padded row
        assert usage["completion_tokens"] == len(direct["caption"].tokenizer.ids(want)) > 1
    text, events = streamed(generative, chat(None, img, stream_options={"include_usage": True}))
    assert text == want and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]
    assert events[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_generative_answer_equals_the_runs_own_answer_streamed_or_not(generative, direct):
    img = noise(11)
    health = generative.get("/healthz").json()
    for n in (MAX_NEW, 3):
        want = direct["genvqa"].answer([img], QUESTION, max_new_tokens=n)[0]
        body = chat(QUESTION, img, model=health["answerer"], max_tokens=n)  # what the page's ask panel sends
        out = generative.post("/v1/chat/completions", json=body).json()
        assert out["choices"][0]["message"]["content"] == want and out["model"] == "caption-tiny:answerer"
        assert streamed(generative, body)[0] == want
    sampled = direct["genvqa"].answer([img], QUESTION, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5,
                                      seed=7)[0]  # fmt: skip
    out = generative.post("/v1/chat/completions", json=chat(QUESTION, img, temperature=1.5, seed=7)).json()
    assert out["choices"][0]["message"]["content"] == sampled


def test_classifier_answers_from_its_vocabulary_and_ignores_sampling(classifier, direct):
    img = noise(12)
    want = direct["vqa"].answer([img], QUESTION)[0]
    assert want in ANSWERS
    for fields in ({}, {"temperature": 1.2, "top_p": 0.5, "seed": 3, "max_tokens": 1}):
        out = classifier.post("/v1/chat/completions", json=chat(QUESTION, img, **fields)).json()
        assert out["choices"][0]["message"]["content"] == want and out["model"] == "vqa-tiny"
        assert out["choices"][0]["finish_reason"] == "stop"  # chosen whole, never cut by max_tokens
        text, events = streamed(classifier, chat(QUESTION, img, **fields))
        assert text == want and events[-1]["choices"][0]["finish_reason"] == "stop"
    other = [direct["vqa"].answer([noise(s)], QUESTION)[0] for s in range(13, 21)]
    assert all(a in ANSWERS for a in other)


@pytest.mark.parametrize(
    "body, words",
    [
        (chat(QUESTION), "one image per question and got 0"),
        (chat(QUESTION, noise(1), noise(2)), "one image per question and got 2"),
        (chat(None, noise(1), model="caption-tiny:answerer"), "ask a question"),
        (chat(QUESTION, noise(1), model="caption-tiny"), "caption-tiny:answerer"),  # not served: the ids are named
        (chat(QUESTION, noise(1), temperature=0.5, top_p=0), "top_p"),
    ],
)
def test_bad_requests_get_400_saying_what_to_send(generative, body, words):
    r = generative.post("/v1/chat/completions", json=body)
    assert r.status_code in (400, 404, 422) and words in r.text, r.text


def test_one_generative_run_can_play_both_roles(runs, direct):
    model = mmfusion.load(str(runs["genvqa"]), device="cpu")
    img = noise(14)
    with TestClient(create_app(ServeSettings(max_new_tokens=MAX_NEW), captioner=model, answerer=model),
                    base_url="http://127.0.0.1") as c:  # fmt: skip
        health = c.get("/healthz").json()
        assert health["captioner"] == health["answerer"] == "caption-tiny"
        caption = c.post("/v1/chat/completions", json=chat(None, img, model="caption-tiny")).json()
        answer = c.post("/v1/chat/completions", json=chat(QUESTION, img, model="caption-tiny")).json()
    assert caption["choices"][0]["message"]["content"] == direct["genvqa"].caption([img], max_new_tokens=MAX_NEW)[0]
    assert answer["choices"][0]["message"]["content"] == direct["genvqa"].answer([img], QUESTION,
                                                                                 max_new_tokens=MAX_NEW)[0]  # fmt: skip


@pytest.mark.parametrize(
    "role, run, words",
    [
        ("answerer", "caption", "mmfusion train vqa"),  # a captioner trained on captions only answers nothing
        ("captioner", "vqa", "mmfusion train caption"),
    ],
)
def test_a_run_in_the_wrong_role_is_refused_at_start_up_naming_both_kinds(runs, role, run, words):
    settings = ServeSettings(**{role: str(runs[run])})
    with pytest.raises(ValueError, match=words) as e:
        asyncio.run(Service.open(settings))
    assert "hf:" in str(e.value)


def wait(client: TestClient, job_id: str, timeout: float = 15.0) -> dict:
    """The finished job; well under the visibility timeout (30 s), so an item left waiting for it fails the test."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def run_jobs(client: TestClient, direct, answerer: str) -> None:
    """A caption job and an answer job of three images; each result equals the run's own call."""
    imgs = [noise(30 + i) for i in range(3)]
    urls = [data_url(im) for im in imgs]
    cap = client.post("/jobs", json={"task": "caption", "images": urls})
    qs = [QUESTION, "how many shapes are there?", "is there a square?"]
    ans = client.post("/jobs", json={"task": "answer", "images": urls, "questions": qs})
    assert cap.status_code == ans.status_code == 202
    captions = [r["caption"] for r in wait(client, cap.json()["id"])["results"]]
    answers = [r["answer"] for r in wait(client, ans.json()["id"])["results"]]
    assert captions == [direct["caption"].caption([im], max_new_tokens=MAX_NEW)[0] for im in imgs]
    assert answers == [direct[answerer].answer([im], q, max_new_tokens=MAX_NEW)[0] for im, q in zip(imgs, qs)]
    if answerer == "vqa":
        assert all(a in ANSWERS for a in answers)


@pytest.mark.parametrize("answerer", ["genvqa", "vqa"])
def test_sqlite_jobs_run_the_own_models(runs, direct, answerer, tmp_path):
    with serve(runs, "caption", answerer, jobs_db=str(tmp_path / "jobs.sqlite")) as c:
        run_jobs(c, direct, answerer)


@pytest.fixture
def fresh(redis_url):  # noqa: F811
    """An empty Redis (the server is shared by the module's tests)."""
    redis = pytest.importorskip("redis")
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    r.close()
    return redis_url


@pytest.mark.parametrize("answerer", ["genvqa", "vqa"])
def test_redis_jobs_run_the_own_models(runs, direct, answerer, fresh):
    # the process that runs the items is the one `mmfusion worker --redis URL --captioner RUN --answerer RUN`
    # starts (a Service with its Redis runner; here it also answers the routes). Both queues hold items at once: a
    # read of both must not leave one delivered and idle until the visibility timeout
    with serve(runs, "caption", answerer, redis_url=fresh, job_heartbeat_s=0.2) as c:
        run_jobs(c, direct, answerer)


def test_the_worker_command_runs_own_runs_for_an_api_replica(runs, direct, fresh, tmp_path):
    """`mmfusion worker --redis URL --captioner RUN --answerer RUN` as a real process; an API replica without
    models (--no-worker) takes the jobs."""
    from tests.cli.test_worker import Procs, _wait_ready

    procs = Procs(tmp_path)
    try:
        p = procs.start("worker", "--redis", fresh, "--captioner", str(runs["caption"]), "--answerer",
                        str(runs["vqa"]), "--threads", "1", "--job-heartbeat-s", "0.2",
                        "--max-new-tokens", str(MAX_NEW))  # fmt: skip
        _wait_ready(procs, p, "taking caption, answer items")
        with TestClient(create_app(ServeSettings(redis_url=fresh, worker=False)), base_url="http://127.0.0.1") as c:
            run_jobs(c, direct, "vqa")
    finally:
        procs.kill_all()
