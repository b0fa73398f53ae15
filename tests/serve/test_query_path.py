"""One query path: ``mmfusion search`` and the service rank the same images, with the same scores, for the same
text and image queries (both encode queries with :class:`~mmfusion.index.encoder.QueryEncoder`)."""

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import mmfusion  # noqa: E402
from mmfusion.cli.main import main  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import LOCAL  # noqa: E402

K = 12
TEXTS = ["a red circle", "two blue squares and a green star"]


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> list:
    """Query images unlike the indexed ones: odd sizes (the resize and crop matter), an RGBA one, a JPEG."""
    root = tmp_path_factory.mktemp("queries")
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (size, mode, fmt) in enumerate([((97, 61), "RGB", "PNG"), ((40, 130), "RGBA", "PNG"),
                                           ((300, 200), "RGB", "JPEG")]):  # fmt: skip
        pixels = (torch.rand(size[1], size[0], len(mode), generator=g) * 255).byte().numpy()
        path = root / f"query{i}.{fmt.lower()}"
        Image.fromarray(pixels, mode).save(path, format=fmt)
        out.append(path)
    return out


@pytest.fixture(scope="module", params=["index's model", "given embedder"])
def client(request, served):
    """The service on the index, with the index's own model or with the same model built and passed in."""
    model, db = served
    given = {"embedder": mmfusion.load(str(model), device="cpu")} if request.param == "given embedder" else {}
    with TestClient(create_app(ServeSettings(db=str(db)), **given), base_url=LOCAL) as c:
        yield c


def cli_search(capsys, db, *args: str) -> list[tuple[int, float]]:
    assert main(["search", *args, "--db", str(db), "-k", str(K), "--json"]) == 0
    return [(r["id"], r["score"]) for r in json.loads(capsys.readouterr().out)]


def ranking(response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(r["id"], r["score"]) for r in response.json()["results"]]


def assert_same(cli: list[tuple[int, float]], service: list[tuple[int, float]]) -> None:
    assert len(cli) == K and [i for i, _ in service] == [i for i, _ in cli]
    np.testing.assert_allclose([s for _, s in service], [s for _, s in cli], atol=1e-5)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("text", TEXTS)
def test_text_queries_rank_alike(capsys, served, client, text):
    assert_same(cli_search(capsys, served[1], text), ranking(client.post("/search", json={"text": text, "k": K})))


@pytest.mark.parametrize("i", range(3))
def test_image_queries_rank_alike_uploaded_and_as_data_urls(capsys, served, client, queries, i):
    path = queries[i]
    cli = cli_search(capsys, served[1], "--image", str(path))
    upload = client.post("/search/upload", files={"image": (path.name, path.read_bytes())}, data={"k": str(K)})
    assert_same(cli, ranking(upload))
    assert_same(cli, ranking(client.post("/search", json={"image": data_url(path), "k": K})))


def test_text_plus_image_ranks_alike(capsys, served, client, queries):
    path = queries[0]
    cli = cli_search(capsys, served[1], TEXTS[0], "--image", str(path))
    both = client.post("/search/upload", files={"image": (path.name, path.read_bytes())},
                       data={"text": TEXTS[0], "k": str(K)})  # fmt: skip
    assert_same(cli, ranking(both))


def test_the_comparison_can_fail(capsys, served, client, queries):
    """A negative control: different queries give different rankings, so equal ones above mean something."""
    text = ranking(client.post("/search", json={"text": TEXTS[0], "k": K}))
    image = cli_search(capsys, served[1], "--image", str(queries[0]))
    with pytest.raises(AssertionError):
        assert_same(image, text)
