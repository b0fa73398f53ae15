"""The service's routes, with FastAPI's test client, and with the OpenAI client against a running server."""

import base64
import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import mmfusion  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import LOCAL, run_server  # noqa: E402
from tests.utils import huge_png_header  # noqa: E402


def data_url(img: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def client(served):
    model, db = served
    with TestClient(
        create_app(ServeSettings(db=str(db), max_body_bytes=2_000_000, max_pixels=10_000_000)), base_url=LOCAL
    ) as c:
        yield c


def test_health_models_and_metrics(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["images"] == 24 and h["model"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == h["model"]
    client.post("/v1/embeddings", json={"input": ["a red circle", "a blue star"]})
    text = client.get("/metrics").text
    assert "mmfusion_requests_total" in text and "mmfusion_batch_size_bucket" in text
    assert "mmfusion_queue_depth" in text


def test_embeddings_equal_the_model_and_are_cached(client, served):
    model = mmfusion.load(served[0])
    texts = ["a red circle", "two green squares", "a red circle"]
    r = client.post("/v1/embeddings", json={"input": texts}).json()
    got = np.array([d["embedding"] for d in r["data"]])
    np.testing.assert_allclose(got, model.encode_text(texts).detach().numpy(), atol=1e-5)
    assert [d["index"] for d in r["data"]] == [0, 1, 2] and r["usage"]["prompt_tokens"] > 0
    b64 = client.post("/v1/embeddings", json={"input": "a red circle", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, got[0], atol=1e-6)
    assert 'mmfusion_text_cache_total{result="hit"}' in client.get("/metrics").text
    img = Image.new("RGB", (64, 64), (220, 40, 40))
    r = client.post("/v1/embeddings", json={"input": [data_url(img)], "modality": "image"}).json()
    np.testing.assert_allclose(r["data"][0]["embedding"], model.encode_image([img])[0].detach().numpy(), atol=1e-5)


def test_bad_requests_say_what_is_wrong(client):
    assert client.post("/v1/embeddings", json={"input": []}).status_code == 400
    r = client.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"})
    assert r.status_code == 404 and "not served here" in r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": ["/etc/passwd"], "modality": "image"})
    assert r.status_code == 400 and "data URL" in r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": ["data:image/png;base64,!!!"], "modality": "image"})
    assert r.status_code == 400
    r = client.post("/search", json={})
    assert r.status_code == 400 and "nothing to search" in r.json()["error"]["message"]


def test_search_by_text_image_id_and_terms(client, served):
    from mmfusion.index import Index

    with Index.open(served[1]) as ix:
        ref = ix.search(text="a red circle", k=5)
        ref_like = ix.search(like=3, k=4)
    r = client.post("/search", json={"text": "a red circle", "k": 5}).json()["results"]
    assert [x["id"] for x in r] == [x.id for x in ref]
    np.testing.assert_allclose([x["score"] for x in r], [x.score for x in ref], atol=1e-5)
    assert r[0]["thumbnail_url"] == f"/thumbs/{r[0]['id']}" and "path" not in r[0]
    like = client.post("/search", json={"id": 3, "k": 4}).json()["results"]
    assert [x["id"] for x in like] == [x.id for x in ref_like] and like[0]["id"] == 3
    mixed = client.post("/search", json={"terms": [{"text": "a red circle"}, {"id": 3, "weight": -0.5}]})
    assert mixed.status_code == 200 and len(mixed.json()["results"]) > 0
    assert client.post("/search", json={"id": 99999}).status_code == 404
    # search by example: an uploaded file, and the same image as a data URL
    path = ix_path = None
    with Index.open(served[1]) as ix:
        ix_path = ix.store.get([3])[3].path
    raw = open(ix_path, "rb").read()
    up = client.post("/search/upload", files={"image": ("x.png", raw, "image/png")}, data={"k": "3"}).json()
    assert up["results"][0]["id"] == 3 and up["results"][0]["score"] > 0.999
    assert path is None


def test_concurrent_searches_share_one_index_call(served):
    """Searches arriving together go to FAISS in one call; each gets its own results, and one failing term (an
    unknown id) fails only its own request."""
    import asyncio

    import httpx

    from mmfusion.index import Index

    texts = ["a red circle", "a blue square", "two green stars", "a small white cross", "a cyan diamond"]
    with Index.open(served[1]) as ix:
        expected = [[r.id for r in ix.search(text=t, k=k)] for k, t in enumerate(texts, start=2)]
    app = create_app(ServeSettings(db=str(served[1]), max_batch_size=32, max_wait_ms=200))

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url=LOCAL) as c:
            bodies = [{"text": t, "k": k} for k, t in enumerate(texts, start=2)] + [{"id": 99999}]
            responses = await asyncio.gather(*(c.post("/search", json=b) for b in bodies))
            metrics = (await c.get("/metrics")).text
            return [*responses, metrics]

    *responses, metrics = asyncio.run(run())
    assert [[x["id"] for x in r.json()["results"]] for r in responses[:-1]] == expected
    assert responses[-1].status_code == 404 and "99999" in responses[-1].json()["error"]["message"]

    # six searches in at most two index calls: the five texts, embedded together, are searched together (the id
    # search, which needs no embedding, may go first on its own)
    def value(name: str) -> float:
        return float(next(x for x in metrics.splitlines() if x.startswith(name + '{batcher="search"}')).split()[-1])

    assert value("mmfusion_batch_size_count") <= 2 and value("mmfusion_batch_size_sum") == 6


def test_files_are_served_by_id_only(client, served):
    r = client.get("/images/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    thumb = client.get("/thumbs/3")
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size[0] <= 256
    for bad in ("/images/99999", "/images/-1", "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd",
                "/thumbs/../../etc/passwd", "/images/3%2F..%2F..%2Fsecret"):  # fmt: skip
        r = client.get(bad)
        assert r.status_code in (404, 422), bad
        assert b"root:" not in r.content


def test_classify(client):
    img = Image.new("RGB", (64, 64), (40, 40, 40))
    r = client.post("/classify", json={"image": data_url(img), "labels": ["red circle", "blue star", "cat"], "k": 2})
    body = r.json()
    assert r.status_code == 200 and len(body["labels"]) == 2 and body["score"] == "softmax"
    assert body["labels"][0]["score"] >= body["labels"][1]["score"]
    r = client.post("/classify", json={"id": 3, "labels": ["red circle", "blue star"], "threshold": -1})
    assert len(r.json()["labels"]) == 2 and r.json()["score"] == "cosine"
    assert client.post("/classify", json={"labels": ["x"]}).status_code == 400
    assert client.post("/classify", json={"id": 3, "labels": ["x"], "templates": ["no slot"]}).status_code == 400


def test_api_keys(served):
    model, db = served
    app = create_app(ServeSettings(db=str(db), api_keys=["k1"]))
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/healthz").status_code == 200  # probes need no key
        r = c.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer k2"}).status_code == 401
        assert c.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/images/3", headers={"X-API-Key": "k1"}).status_code == 200


def test_settings_from_yaml_env_and_flags(tmp_path):
    (tmp_path / "s.yaml").write_text("port: 9000\nmax_batch_size: 8\napi_keys: [a]\n")
    env = {"MMFUSION_PORT": "9100", "MMFUSION_API_KEYS": "x, y", "MMFUSION_MAX_WAIT_MS": "2.5"}
    s = ServeSettings.load(tmp_path / "s.yaml", env=env, port=9200, max_batch_size=None)
    assert (s.port, s.max_batch_size, s.api_keys, s.max_wait_ms, s.host) == (9200, 8, ["x", "y"], 2.5, "127.0.0.1")
    with pytest.raises(ValueError, match="serve.port"):
        ServeSettings.load(None, env={"MMFUSION_PORT": "eighty"})


def test_openai_client_against_a_running_server(served):
    openai = pytest.importorskip("openai")
    model, db = served
    with run_server(create_app(ServeSettings(db=str(db)))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        models = client.models.list()
        name = models.data[0].id
        out = client.embeddings.create(model=name, input=["a red circle", "a blue star"])
        ref = mmfusion.load(model).encode_text(["a red circle", "a blue star"]).detach().numpy()
        np.testing.assert_allclose([d.embedding for d in out.data], ref, atol=1e-5)  # float and base64 both work
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="x")


def _raw(url: str, head: bytes, body_chunks=(), timeout=5.0) -> tuple[bytes, float]:
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what we want
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except ConnectionResetError:
            pass
    return data, time.perf_counter() - t0


def test_huge_bodies_get_413_fast_and_the_server_stays_up(served, tmp_path):
    model, db = served
    with run_server(create_app(ServeSettings(db=str(db), max_body_bytes=1_000_000))) as url:
        head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n")  # fmt: skip
        resp, seconds = _raw(url, head)
        assert resp.startswith(b"HTTP/1.1 413") and seconds < 1.0
        chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"

        def chunks():  # up to 1 GB, chunked: the server must stop reading long before
            for _ in range(1_000_000_000 // 4096):
                yield chunk

        head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        resp, seconds = _raw(url, head, chunks(), timeout=10)
        assert resp.startswith(b"HTTP/1.1 413") and seconds < 5.0
        import httpx

        assert httpx.get(url + "/healthz").json()["status"] == "ok"
        # a gigapixel PNG header is refused before any decoding
        png = huge_png_header(tmp_path / "bomb.png", 40000, 40000).read_bytes()
        url_img = "data:image/png;base64," + base64.b64encode(png).decode()
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/embeddings", json={"input": [url_img], "modality": "image"}, timeout=10)
        assert r.status_code == 422 and "pixels" in r.json()["error"]["message"]
        assert time.perf_counter() - t0 < 2.0
        assert json.loads(httpx.get(url + "/healthz").text)["status"] == "ok"


def test_every_error_has_the_openai_shape_and_static_files_revalidate(served):
    import httpx

    from mmfusion.serve.app import create_app
    from mmfusion.serve.settings import ServeSettings
    from tests.serve.conftest import run_server

    model, db = served
    with run_server(create_app(ServeSettings(db=str(db)))) as url:
        for r in (httpx.get(url + "/no/such/route"), httpx.post(url + "/search", json={"k": "many"}),
                  httpx.put(url + "/search")):  # fmt: skip
            assert r.status_code in (404, 405, 422) and r.json()["error"]["message"], r.text
        assert "k" in httpx.post(url + "/search", json={"k": "many"}).json()["error"]["message"]
        r = httpx.get(url + "/static/app.js")
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"


def test_openapi_documents_every_json_response():
    """/docs shows a real schema (named properties, not a bare object) for each JSON route's success."""
    spec = TestClient(create_app(ServeSettings()), base_url=LOCAL).get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    routes = {("get", "/v1/models"): "200", ("post", "/v1/embeddings"): "200", ("post", "/v1/chat/completions"): "200",
              ("post", "/search"): "200", ("post", "/search/upload"): "200", ("post", "/classify"): "200",
              ("get", "/healthz"): "200", ("post", "/jobs"): "202", ("get", "/jobs"): "200",
              ("get", "/jobs/{job_id}"): "200", ("delete", "/jobs/{job_id}"): "200"}  # fmt: skip
    for (method, path), status in routes.items():
        schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        assert "$ref" in schema, (method, path, schema)
        model = schemas[schema["$ref"].rsplit("/", 1)[-1]]
        assert model.get("properties") and model.get("required"), (method, path, model)
    assert set(schemas["EmbeddingsResponse"]["properties"]) == {"object", "data", "model", "usage"}
    assert set(schemas["SearchHit"]["properties"]) >= {"id", "score", "name", "metadata", "thumbnail_url"}
    assert set(schemas["Health"]["properties"]) >= {"status", "model", "images", "uptime_s"}
