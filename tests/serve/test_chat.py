"""/v1/chat/completions: questions and captions in OpenAI's shape, with real tiny models and the OpenAI client."""

import base64
import http.server
import io
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion.serve import images as serve_images
from mmfusion.serve.app import create_app
from mmfusion.serve.settings import ServeSettings
from tests.backends.test_hf_caption import tiny_blip
from tests.backends.test_hf_vqa import build_tiny_qwen
from tests.serve.conftest import run_server
from tests.utils import one_thread  # noqa: E402, F401  (autouse: one torch thread)

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def noise(seed: int, size=(64, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def ask(text: str | None, url: str, **fields) -> dict:
    """A chat request body: one user message with an optional text part and one image_url part."""
    parts = ([{"type": "text", "text": text}] if text is not None else []) + [
        {"type": "image_url", "image_url": {"url": url}}
    ]
    return {"messages": [{"role": "user", "content": parts}], **fields}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    qwen, _ = build_tiny_qwen(root / "qwen")
    blip = tiny_blip(root / "blip")
    return mmfusion.load(str(qwen), device="cpu"), mmfusion.load(str(blip), device="cpu")


@pytest.fixture(scope="module")
def server(models, served):
    answerer, captioner = models
    _, db = served
    app = create_app(ServeSettings(db=str(db), max_new_tokens=12), answerer=answerer, captioner=captioner)
    with run_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_lists_every_role(client, models):
    answerer, captioner = models
    listed = {m.id: m.model_extra.get("role") for m in client.models.list().data}
    assert listed[answerer.name] == "answerer" and listed[captioner.name] == "captioner"
    assert "embedder" in listed.values()


def test_question_with_the_openai_client_equals_the_answerer(client, models):
    answerer, _ = models
    img = noise(0)
    out = client.chat.completions.create(
        model=answerer.name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                                {"type": "image_url", "image_url": {"url": data_url(img)}}]}],
        max_tokens=8,
    )  # fmt: skip
    # the parts in the order sent: the text first, then the image
    direct = answerer.answer(messages=[{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                                                    {"type": "image", "image": img}]}],
                             max_new_tokens=8)[0]  # fmt: skip
    assert out.choices[0].message.content == direct and direct
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0 and out.usage.total_tokens >= out.usage.completion_tokens


def test_streaming_pieces_join_to_the_whole_answer(client, models):
    answerer, _ = models
    img = noise(1)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": "How many dogs?"}]}]  # fmt: skip
    whole = client.chat.completions.create(model=answerer.name, messages=messages, max_tokens=10)
    chunks = list(client.chat.completions.create(model=answerer.name, messages=messages, max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices[0].delta.content]) > 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_stream_ends_with_done(server, models):
    answerer, _ = models
    body = ask("Describe it", data_url(noise(2)), model=answerer.name, stream=True, max_tokens=4)
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_caption_of_an_indexed_image_by_id(client, models, served, server):
    _, captioner = models
    hits = httpx.post(server + "/search", json={"text": "a red circle", "k": 1}).json()["results"]
    image_id = hits[0]["id"]
    path = httpx.get(f"{server}/images/{image_id}").content
    out = client.chat.completions.create(
        model=captioner.name,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"mmfusion://images/{image_id}"}}]}],
    )  # fmt: skip
    direct = captioner.caption(Image.open(io.BytesIO(path)).convert("RGB"), max_new_tokens=12)[0]
    assert out.choices[0].message.content == direct and direct


def test_without_a_model_name_an_image_alone_is_captioned_and_a_question_answered(server, models):
    answerer, captioner = models
    img = noise(3)
    r = httpx.post(server + "/v1/chat/completions", json=ask(None, data_url(img)), timeout=60)
    assert r.status_code == 200 and r.json()["model"] == captioner.name
    r = httpx.post(server + "/v1/chat/completions", json=ask("What colour?", data_url(img), max_tokens=3), timeout=60)
    assert r.status_code == 200 and r.json()["model"] == answerer.name


@pytest.mark.parametrize(
    "patch, status, words",
    [
        ({"model": "gpt-4o"}, 404, "not served"),
        ({"stop": ["\n"]}, 400, "stop"),
        ({"max_tokens": 10_000}, 400, "limit of 12"),
        ({"n": 2}, 422, "n"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
         400, "data URL"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
         400, "data URL"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "mmfusion://images/99999"}}]}]},
         404, "99999"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
         400, "--allow-url-fetch"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "not supported"),
    ],
)  # fmt: skip
def test_bad_requests_say_what_is_wrong(server, models, patch, status, words):
    body = ask("What?", data_url(noise(4)), model=models[0].name)
    r = httpx.post(server + "/v1/chat/completions", json={**body, **patch}, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.text


def test_embedding_model_name_points_to_embeddings(server, client):
    name = next(m.id for m in client.models.list().data if m.model_extra.get("role") == "embedder")
    r = httpx.post(server + "/v1/chat/completions", json={"model": name, "messages": [
        {"role": "user", "content": "hello"}]})  # fmt: skip
    assert r.status_code == 400 and "/v1/embeddings" in r.text


# ---- a scripted answerer: streaming that stops when the client leaves ---------------------------------------


class SlowAnswerer:
    """Answers with numbered words, one every 50 ms; records whether its stream was closed."""

    name = "slow"

    def __init__(self):
        self.closed = threading.Event()
        self.produced = 0

    def answer(self, images, questions, **options):
        return [" ".join(str(i) for i in range(options["max_new_tokens"]))]

    def stream_answer(self, image, question, **options):
        try:
            for i in range(options["max_new_tokens"]):
                time.sleep(0.05)
                self.produced += 1
                yield f"{i} "
        finally:
            self.closed.set()


def test_a_client_that_leaves_stops_the_generation():
    slow = SlowAnswerer()
    app = create_app(ServeSettings(max_new_tokens=200), answerer=slow)
    body = ask("count", data_url(noise(5)), stream=True, max_tokens=200)
    with run_server(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 4:
                    break
        assert slow.closed.wait(5), "the generation went on after the client left"
        assert slow.produced < 100
        # and the service still answers
        r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert r.json()["choices"][0]["message"]["content"] == "0 1 2"


def test_errors_during_a_stream_arrive_as_an_event():
    class Broken(SlowAnswerer):
        def stream_answer(self, image, question, **options):
            yield "first "
            raise RuntimeError("out of memory")

    app = create_app(ServeSettings(), answerer=Broken())
    body = ask("q", data_url(noise(6)), stream=True)
    with run_server(app) as url, httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert "generation failed" in lines[-2] and lines[-1] == "data: [DONE]"
    assert "out of memory" not in lines[-2]  # the exception's text stays in the log


# ---- URL fetching: off by default, never to private or loopback addresses ------------------------------------


@pytest.mark.parametrize(
    "address, public",
    [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
     ("192.168.0.1", False), ("172.16.5.4", False), ("169.254.169.254", False), ("::1", False), ("fe80::1", False),
     ("fd00::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("100.64.0.1", False)],
)  # fmt: skip
def test_only_public_addresses_count_as_public(address, public):
    assert serve_images.is_public(address) is public


@pytest.fixture()
def image_site():
    """A loopback HTTP server with /a.png (an image) and /redirect (-> a private address)."""
    png = io.BytesIO()
    noise(7).save(png, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://10.0.0.1/a.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", png.getvalue()
    httpd.shutdown()


def test_fetching_is_refused_for_loopback_even_when_enabled(image_site):
    site, _ = image_site
    app = create_app(ServeSettings(allow_url_fetch=True), answerer=SlowAnswerer())
    body = ask("q", site + "/a.png", max_tokens=2)
    with run_server(app) as url:
        for target in (site + "/a.png", site.replace("127.0.0.1", "localhost") + "/a.png"):
            body["messages"][0]["content"][1]["image_url"]["url"] = target
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 400 and "private, loopback or reserved" in r.text, r.text


def test_fetching_follows_checks_on_every_hop(image_site, monkeypatch):
    """With loopback treated as public (the test's stand-in for the internet), a public image is fetched, and a
    redirect to a private address is refused at the redirect."""
    site, png = image_site
    real = serve_images.is_public
    monkeypatch.setattr(serve_images, "is_public", lambda a: a == "127.0.0.1" or real(a))
    assert serve_images.fetch_url(site + "/a.png", max_bytes=10**6) == png
    with pytest.raises(Exception, match="10.0.0.1"):
        serve_images.fetch_url(site + "/redirect", max_bytes=10**6)
    with pytest.raises(Exception, match="over 100 bytes"):
        serve_images.fetch_url(site + "/a.png", max_bytes=100)


def test_a_name_that_resolves_to_a_private_address_is_refused(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                                                  ("10.9.8.7", 80))])  # fmt: skip
    with pytest.raises(Exception, match="10.9.8.7"):
        serve_images.fetch_url("http://images.example.com/a.png", max_bytes=10**6)
