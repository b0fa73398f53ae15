"""Bad input at the edges: ids out of range, non-finite numbers, per-request budgets, the Host allowlist,
max_tokens and streamed usage, and the memory budget for request bodies."""

import asyncio
import base64
import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.limits import BodyLimitMiddleware, ByteBudget, HostCheckMiddleware, allowed_hosts  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import LOCAL, run_server  # noqa: E402
from tests.serve.test_jobs import MeanColour  # noqa: E402

HUGE = 99999999999999999999999  # past SQLite's INTEGER
TOO_BIG = 2**63


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def app_client(served):
    _, db = served
    settings = ServeSettings(db=str(db), max_search_terms=8, max_prompts=100, max_chars=10_000, max_new_tokens=8)
    model = MeanColour()
    with TestClient(create_app(settings, captioner=model, answerer=model), base_url=LOCAL) as c:
        yield c, db


def problems(r, status: int, db) -> str:
    """The error message of a refused request, after checking what every refusal must be."""
    assert r.status_code == status, r.text
    body = r.json()  # valid JSON, always
    message = body["error"]["message"]
    assert str(db) not in r.text and "/tmp" not in r.text and "Traceback" not in r.text
    return message


def chat_about(url: str, **fields) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
        **fields,
    }


def test_ids_out_of_range_are_422_everywhere_and_name_the_range(app_client):
    c, db = app_client
    for path in (f"/images/{HUGE}", f"/thumbs/{HUGE}", "/images/-1", f"/thumbs/{TOO_BIG}"):
        msg = problems(c.get(path), 422, db)
        assert "less than or equal to 9223372036854775807" in msg or "greater than or equal to 0" in msg
    for body in ({"id": TOO_BIG}, {"id": -1}, {"terms": [{"id": HUGE}]}):
        problems(c.post("/search", json=body), 422, db)
    problems(c.post("/classify", json={"labels": ["red"], "id": TOO_BIG}), 422, db)
    msg = problems(c.post("/v1/chat/completions", json=chat_about(f"mmfusion://images/{HUGE}")), 422, db)
    assert "image ids are 0 to" in msg
    problems(c.post("/v1/chat/completions", json=chat_about("mmfusion://images/" + "9" * 5000)), 422, db)
    problems(c.post("/jobs", json={"task": "caption", "images": [1, TOO_BIG]}), 422, db)
    problems(c.post("/jobs", json={"task": "caption", "images": [f"mmfusion://images/{HUGE}"]}), 422, db)


def test_a_missing_id_is_named_once_without_the_index_path(app_client):
    c, db = app_client
    msg = problems(c.post("/search", json={"id": 123456}), 404, db)
    assert msg == "no indexed image has id 123456"
    msg = problems(c.post("/search", json={"text": "red", "terms": [{"id": 1}, {"id": 777}]}), 404, db)
    assert msg == "no indexed image has id 777"
    assert problems(c.get("/images/123456"), 404, db) == "no indexed image has id 123456"


def test_non_finite_numbers_are_422_with_a_json_body(app_client):
    c, db = app_client
    for path, raw in (
        ("/v1/embeddings", '{"input": NaN}'),
        ("/v1/embeddings", '{"x": Infinity}'),
        ("/search", '{"text": "red", "threshold": NaN}'),
        ("/search", '{"text": "red", "terms": [{"text": "blue", "weight": -Infinity}]}'),
        ("/search", '{"text": "red", "terms": [{"text": "blue", "weight": 1e308}]}'),
        ("/classify", '{"labels": ["red"], "id": 1, "threshold": NaN}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}'),
    ):
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
        msg = problems(r, 422, db)
        assert "NaN" not in r.text and "Infinity" not in r.text, msg


def test_validation_errors_do_not_echo_the_input(app_client):
    c, db = app_client
    big = "x" * 100_000
    r = c.post("/search", json={"text": "red", "k": big})
    problems(r, 422, db)
    assert len(r.content) < 2_000 and big[:1000] not in r.text


def test_per_request_budgets_are_413_naming_the_limit_before_model_work(app_client):
    c, db = app_client
    msg = problems(c.post("/search", json={"terms": [{"text": f"t{i}"} for i in range(9)]}), 413, db)
    assert "9 search terms" in msg and "limit is 8" in msg and "--max-search-terms" in msg
    msg = problems(c.post("/v1/embeddings", json={"input": ["x" * 6000, "y" * 6000]}), 413, db)
    assert "12,000 characters" in msg and "--max-chars" in msg
    msg = problems(c.post("/classify", json={"labels": [f"l{i}" for i in range(11)], "id": 1,
                                             "templates": [f"a {{}} {i}" for i in range(10)]}), 413, db)  # fmt: skip
    assert "110 prompts" in msg and "--max-prompts" in msg
    msg = problems(c.post("/classify", json={"labels": [f"l{i}" for i in range(7)], "id": 1}), 413, db)
    assert "112 prompts" in msg  # 7 labels x the 16 default templates
    problems(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q" * 20_000}]}), 413, db)
    problems(c.post("/jobs", json={"task": "answer", "images": [1], "question": "q" * 20_000}), 413, db)
    # within the budgets, the same routes work
    assert c.post("/search", json={"terms": [{"text": f"t{i}"} for i in range(8)]}).status_code == 200
    assert c.post("/classify", json={"labels": ["red", "blue"], "id": 1}).status_code == 200


def test_max_tokens_over_the_limit_is_400_as_openai_does(app_client):
    c, db = app_client
    body = chat_about("mmfusion://images/1", max_tokens=1000)
    msg = problems(c.post("/v1/chat/completions", json=body), 400, db)
    assert "limit of 8" in msg
    assert c.post("/v1/chat/completions", json=chat_about("mmfusion://images/1", max_tokens=8)).status_code == 200
    body = chat_about("mmfusion://images/1", stream_options={"include_usage": True})
    assert "only allowed with stream" in problems(c.post("/v1/chat/completions", json=body), 400, db)


def test_streamed_usage_reaches_the_openai_client(served):
    openai = pytest.importorskip("openai")
    _, db = served
    model = MeanColour()
    with run_server(create_app(ServeSettings(db=str(db)), captioner=model, answerer=model)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        msgs = chat_about("mmfusion://images/1")["messages"]
        chunks = list(client.chat.completions.create(model="mean-colour", messages=msgs, stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == len(text.split()) > 0
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
        assert all(ch.usage is None for ch in chunks[:-1])
        plain = list(client.chat.completions.create(model="mean-colour", messages=msgs, stream=True))
        assert (
            all(ch.usage is None for ch in plain)
            and "".join(ch.choices[0].delta.content or "" for ch in plain if ch.choices) == text
        )


def test_the_host_allowlist(served):
    _, db = served
    app = create_app(ServeSettings(db=str(db), allowed_hosts=["photos.example.org", "*.lan"]))
    with TestClient(app, base_url=LOCAL) as c:
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "10.1.2.3:80", "LOCALHOST.", "app.localhost",
                     "photos.example.org", "nas.lan:8000"):  # fmt: skip
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "127.0.0.1.evil.example", "photos.example.org.evil", "lan"):
            r = c.get("/healthz", headers={"host": host})
            assert r.status_code == 400 and "allowed_hosts" in r.json()["error"]["message"], host
            assert c.post("/search", json={"text": "red"}, headers={"host": host}).status_code == 400


def test_allowed_hosts_of_a_wildcard_bind_include_this_machine():
    import socket

    mw = HostCheckMiddleware(None, allowed_hosts("0.0.0.0"))
    assert mw.allows(socket.gethostname()) and mw.allows("localhost") and not mw.allows("evil.example")
    assert not HostCheckMiddleware(None, allowed_hosts("127.0.0.1")).allows(socket.gethostname() + ".evil")
    assert HostCheckMiddleware(None, ["*"]).allows("anything.at.all")


# ---- the memory budget of request bodies ------------------------------------------------------------------


def test_the_byte_budget_is_first_come_first_served_and_times_out():
    async def main():
        budget = ByteBudget(100)
        assert await budget.acquire(60, 1) == 60
        order = []

        async def want(n, name):
            got = await budget.acquire(n, 5)
            order.append(name)
            return got

        big = asyncio.create_task(want(80, "big"))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(want(10, "small"))  # fits now, but waits behind the big one: no starving
        await asyncio.sleep(0.01)
        assert order == [] and budget.used == 60
        budget.release(60)
        assert await big == 80 and await small == 10 and order == ["big", "small"]
        budget.release(80)
        budget.release(10)
        assert await budget.acquire(500, 1) == 100  # more than the whole budget: it takes the whole budget
        assert await ByteBudget(10).acquire(5, 0.01) == 5
        full = ByteBudget(10)
        await full.acquire(10, 1)
        assert await full.acquire(1, 0.05) is None and full._waiters == type(full._waiters)()
        full.release(10)
        assert full.used == 0

    asyncio.run(main())


def test_large_bodies_wait_for_the_budget_and_small_ones_do_not():
    """Three 100 KB bodies with a budget of 250 KB: at most two are read at once; a small body never waits;
    the idle hook runs once the last large one is done."""
    inside, peak, idle = [0], [0], []
    gate = asyncio.Event()

    async def app(scope, receive, send):
        body = (await receive())["body"]
        inside[0] += 1
        peak[0] = max(peak[0], inside[0])
        if len(body) > 1000:
            await gate.wait()
        inside[0] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    mw = BodyLimitMiddleware(app, max_bytes=1_000_000, max_memory=250_000, on_idle=lambda: idle.append(1))

    async def request(n: int, chunked: bool = False) -> list:
        sent = []
        headers = [] if chunked else [(b"content-length", str(n).encode())]
        scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
        messages = [{"type": "http.request", "body": b"x" * n, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        await mw(scope, receive, send)
        return sent

    async def main():
        large = [asyncio.create_task(request(100_000)) for _ in range(2)] + [
            asyncio.create_task(request(100_000, chunked=True))
        ]
        await asyncio.sleep(0.05)
        assert peak[0] == 2 and mw.budget.used == 200_000  # the third (chunked: it may be max_bytes) waits
        small = await asyncio.wait_for(request(100), 1)
        assert small[-1]["body"] == b"100"
        gate.set()
        done = await asyncio.gather(*large)
        assert [d[-1]["body"] for d in done] == [b"100000"] * 3 and mw.budget.used == 0 and idle

    asyncio.run(main())


def test_settings_reach_the_flags():
    from mmfusion.cli.main import make_parser

    args = make_parser().parse_args(
        [
            "serve",
            "--allowed-host",
            "a.lan",
            "--allowed-host",
            "b.lan",
            "--max-chars",
            "5",
            "--max-search-terms",
            "2",
            "--max-body-memory",
            "9",
        ]
    )
    assert args.allowed_hosts == ["a.lan", "b.lan"] and args.max_chars == 5 and args.max_search_terms == 2
    assert args.max_body_memory == 9


def test_a_seed_past_64_bits_is_400_not_a_crash(app_client):
    c, db = app_client
    msg = problems(c.post("/v1/chat/completions", json=chat_about("mmfusion://images/1", seed=2**70)), 400, db)
    assert "seed" in msg and "2**64" in msg
    problems(c.post("/jobs", json={"task": "caption", "images": [1], "seed": -(2**64)}), 400, db)
