"""Property-based fuzzing of every route: whatever JSON arrives (huge ints, NaN, deep nesting, long strings,
wrong types, near-valid bodies built from each route's own schema), the answer is never a 5xx and always JSON.

The request shapes are read from the app's OpenAPI schema, so a new route is fuzzed without a change here.
"""

import base64
import io
import json
from urllib.parse import quote

import pytest
from PIL import Image

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import LOCAL  # noqa: E402
from tests.serve.test_jobs import MeanColour  # noqa: E402


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


NASTY = [2**63, 2**63 - 1, 2**64, -(2**63) - 1, -1, 0, 10**30, 1e308, -0.0, "9" * 5000, "", "\x00", "\ud800",
         "mmfusion://images/1", "mmfusion://images/99999999999999999999999", "data:image/png;base64,AAAA",
         "data:,", "/etc/passwd", "file:///etc/passwd", "../../etc/passwd", "http://127.0.0.1:1/x.png",
         "{}", "a {}"]  # fmt: skip
NASTY.append("data:image/png;base64," + base64.b64encode(_png()).decode())  # a real image, too
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(NASTY), st.integers(1000, 30_000).map(lambda n: "x" * n),
)  # fmt: skip
JSON = st.recursive(
    SCALARS, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=12
)


def shaped(schema: dict, defs: dict, wild: bool, depth: int = 0) -> st.SearchStrategy:
    """Values of the types ``schema`` (an OpenAPI schema) names, edge values included (huge ints, NaN, long
    strings); ``wild``: each value may also be any JSON at all."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if depth > 4:
        return JSON
    options = [shaped(s, defs, wild, depth + 1) for s in schema.get("anyOf", [])]
    kind = schema.get("type")
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    if "const" in schema:
        options.append(st.just(schema["const"]))
    if kind == "object" and "properties" in schema:
        props = {k: shaped(v, defs, wild, depth + 1) for k, v in schema["properties"].items()}
        required = {k: props.pop(k) for k in schema.get("required", [])}
        options.append(st.fixed_dictionaries(required, optional=props))
    elif kind == "array":
        options.append(st.lists(shaped(schema.get("items", {}), defs, wild, depth + 1), max_size=5))
    elif kind == "integer":
        options.append(st.integers(-5, 40) | st.sampled_from([2**63 - 1, 2**63, -(2**63)]))
    elif kind == "number":
        options.append(st.floats(-3, 3) | st.floats(allow_nan=True, allow_infinity=True))
    elif kind == "string":
        options.append(st.text(max_size=20) | st.sampled_from([x for x in NASTY if isinstance(x, str)]))
    elif kind == "boolean":
        options.append(st.booleans())
    if not options:
        return JSON
    return st.one_of(*options, JSON) if wild else st.one_of(*options)


@pytest.fixture(scope="module")
def fuzzed(served):
    _, db = served
    model = MeanColour()
    app = create_app(ServeSettings(db=str(db), max_new_tokens=4, max_job_images=8), captioner=model, answerer=model)
    with TestClient(app, base_url=LOCAL) as client:
        spec = client.get("/openapi.json").json()
        defs = spec["components"]["schemas"]
        bodies, gets = [], []
        for path, methods in spec["paths"].items():
            for method, op in methods.items():
                content = op.get("requestBody", {}).get("content", {})
                if "application/json" in content:
                    schema = content["application/json"]["schema"]
                    bodies.append((path, shaped(schema, defs, False) | shaped(schema, defs, True)))
                elif method in ("get", "delete") and "{" in path:
                    gets.append((method, path))
        yield client, bodies, gets


def check(r) -> None:
    """Never a 5xx; an error is JSON, and so is every event of a stream."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    kind = r.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
    elif r.status_code >= 400 or kind.startswith("application/json"):
        assert kind.startswith("application/json"), (r.request.url, r.status_code, r.text[:200])
        json.loads(r.text)


FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # fmt: skip


@FUZZ
@given(data=st.data())
def test_json_routes_never_answer_5xx(fuzzed, data):
    client, bodies, _ = fuzzed
    path, strategy = data.draw(st.sampled_from(bodies), label="route")
    body = data.draw(st.one_of(strategy, JSON), label="body")
    raw = json.dumps(body, allow_nan=True)  # NaN and Infinity go out as JavaScript writes them
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    event(f"{path} {r.status_code}")  # --hypothesis-show-statistics: how often each route got past validation
    check(r)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_raw_bodies_and_path_ids_never_answer_5xx(fuzzed, data):
    client, bodies, gets = fuzzed
    path, _ = data.draw(st.sampled_from(bodies), label="route")
    kind, n = data.draw(st.sampled_from(["array", "object", "bytes", "broken"]), label="kind"), data.draw(
        st.integers(1, 200_000), label="n")  # fmt: skip
    if kind == "array":  # deep nesting, built here so that hypothesis never prints megabytes
        raw = "[" * n + "]" * n
    elif kind == "object":
        raw = '{"a":' * (n // 4) + "1" + "}" * (n // 4)
    elif kind == "bytes":
        raw = data.draw(st.binary(max_size=200), label="bytes").decode("latin-1")
    else:
        raw = ['{"input": "x"', "nul\x00l", '{"input": "\\ud800"}', "1e999999", "-" * 10][n % 5]
    check(client.post(path, content=raw.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}))
    method, template = data.draw(st.sampled_from(gets), label="get")
    segment = data.draw(
        st.one_of(
            st.integers(-(2**80), 2**80).map(str),
            st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
                lambda t: t.strip(".")
            ),
        )
    )
    check(client.request(method, template.split("{", 1)[0] + quote(segment, safe="")))  # fmt: skip
