"""``POST /search`` with ``rerank=true``: the service's re-ranker re-orders the top results, as the CLI's does."""

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmfusion.index import Index  # noqa: E402
from mmfusion.index.rerank import load_reranker, search_reranked  # noqa: E402
from mmfusion.models import load, save_model  # noqa: E402
from mmfusion.models.reranker import Reranker, RerankerConfig  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.serve.conftest import LOCAL  # noqa: E402


@pytest.fixture(scope="module")
def reranker(served, tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = Reranker.from_clip(load(served[0]), RerankerConfig(width=16, layers=1, heads=2))
    with torch.no_grad():
        model.head.weight.normal_()  # an order of its own, unlike the CLIP's
    return save_model(model, tmp_path_factory.mktemp("rr") / "rr")


def test_rerank_true_answers_as_the_command_line_does(served, reranker):
    _, db = served
    with TestClient(create_app(ServeSettings(db=str(db), reranker=str(reranker), rerank_k=10)), base_url=LOCAL) as c:
        got = c.post("/search", json={"text": "a red circle", "k": 5, "rerank": True})
        plain = c.post("/search", json={"text": "a red circle", "k": 5}).json()["results"]
        image_only = c.post("/search", json={"id": plain[0]["id"], "rerank": True})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    assert len(results) == 5 and all("similarity" in r["metadata"] for r in results)
    with Index.open(db) as ix:
        want = search_reranked(ix, load_reranker(str(reranker)), "a red circle", k=5, rerank_k=10)
    assert [r["id"] for r in results] == [r.id for r in want]
    assert [r["score"] for r in results] == pytest.approx([r.score for r in want], abs=1e-4)
    assert all("similarity" not in r["metadata"] for r in plain)
    assert image_only.status_code == 400 and "give a text" in image_only.json()["error"]["message"]


def test_rerank_without_a_reranker_says_how_to_add_one(served):
    with TestClient(create_app(ServeSettings(db=str(served[1]))), base_url=LOCAL) as c:
        r = c.post("/search", json={"text": "a red circle", "rerank": True})
    assert r.status_code == 400 and "--reranker" in r.json()["error"]["message"]


def test_a_captioner_run_is_a_reranker_for_the_service(served, tmp_path):
    from tests.tiny_generators import tiny_generators

    captioner = tiny_generators(tmp_path)["caption"]
    _, db = served
    with TestClient(create_app(ServeSettings(db=str(db), reranker=str(captioner), rerank_k=8)), base_url=LOCAL) as c:
        got = c.post("/search", json={"text": "a blue square", "k": 4, "rerank": True})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    with Index.open(db) as ix:  # the likelihood of the words plus the first stage's share, as the CLI ranks
        want = search_reranked(ix, load_reranker(str(captioner)), "a blue square", k=4, rerank_k=8)
        paths = {i: row.path for i, row in ix.store.get([r["id"] for r in results]).items()}
    assert [r["id"] for r in results] == [r.id for r in want]
    from PIL import Image

    from mmfusion.models.caption_ranker import as_reranker

    ranker = as_reranker(load(captioner).eval())  # the mix itself: likelihood + weight x the first stage's cosine
    likelihood = ranker.score("a blue square", [Image.open(paths[r["id"]]).convert("RGB") for r in results]).numpy()
    mixed = likelihood + ranker.first_stage_weight * np.array([r["metadata"]["similarity"] for r in results])
    assert [r["score"] for r in results] == pytest.approx(mixed.tolist(), abs=1e-3)
