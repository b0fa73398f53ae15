"""Re-ranking a search's top K: the order follows the scorer, the plumbing keeps what it should, a real re-ranker
scores decoded files as it scores images, and ``mmfusion search --rerank`` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.index import Index
from mmfusion.index.query import Term
from mmfusion.index.rerank import SearchReranker, rerank_results, rerank_text, search_reranked
from mmfusion.models import load, save_model
from mmfusion.models.reranker import Reranker, RerankerConfig
from tests.utils import (
    one_thread,  # noqa: E402, F401  (autouse: one torch thread)
    tiny_clip,
)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """(clip dir, index dir, photos dir) for 12 ShapesWorld images."""
    from mmfusion.data.shapes import ShapesWorld

    root = tmp_path_factory.mktemp("rerank")
    clip = tiny_clip(root / "clip")
    world = ShapesWorld()
    photos = root / "photos"
    photos.mkdir()
    for i in range(12):
        world.sample("test", i).image.save(photos / f"scene{i:02d}.png")
    with Index.open(root / "db", model=clip, write=True) as ix:
        ix.update([photos], progress=False)
    return clip, root / "db", photos


class PrefersNames:
    """A stub scorer with a known preference: files whose name has a higher number score higher."""

    def __init__(self):
        self.seen: list[tuple[str, list[int]]] = []

    def score_files(self, text, rows):
        self.seen.append((text, [r.id for r in rows]))
        return np.array([float(r.path[-6:-4]) for r in rows])


def test_the_top_k_is_reordered_as_the_scorer_says(indexed):
    _, db, _ = indexed
    stub = PrefersNames()
    with Index.open(db) as ix:
        first = ix.search("a red circle", k=8)
        got = search_reranked(ix, stub, "a red circle", k=5, rerank_k=8)
    assert stub.seen == [("a red circle", [r.id for r in first])]  # the first stage's top 8, the query's text
    numbers = sorted((int(r.path[-6:-4]) for r in first), reverse=True)[:5]
    assert [int(r.path[-6:-4]) for r in got] == numbers
    assert [r.score for r in got] == [float(n) for n in numbers]  # scores are the re-ranker's
    by_id = {r.id: r.score for r in first}
    assert all(r.metadata["similarity"] == round(by_id[r.id], 6) for r in got)  # the cosine is kept


def test_results_past_rerank_k_keep_their_place(indexed):
    _, db, _ = indexed
    with Index.open(db) as ix:
        first = ix.search("a blue square", k=10)
        got = search_reranked(ix, PrefersNames(), "a blue square", k=10, rerank_k=4)
    assert {r.id for r in got[:4]} == {r.id for r in first[:4]}
    assert [r.id for r in got[4:]] == [r.id for r in first[4:]]


def test_an_unreadable_file_goes_last(indexed, tmp_path):
    _, db, photos = indexed
    model = Reranker.from_clip(load(indexed[0]), RerankerConfig(width=16, layers=1, heads=2))
    with Index.open(db) as ix:
        first = ix.search("a red circle", k=4)
        rows = ix.store.get([r.id for r in first])
        gone = rows[first[0].id]
        saved = open(gone.path, "rb").read()
        try:
            open(gone.path, "wb").write(b"not an image")
            got = rerank_results(SearchReranker(model), rows, "a red circle", first)
        finally:
            open(gone.path, "wb").write(saved)
    assert got[-1].id == first[0].id and len(got) == 4


def test_only_a_text_query_can_be_reranked():
    assert rerank_text([Term(1.0, "text", "a red"), Term(-1.0, "text", "blue"), Term(1.0, "id", 3)]) == "a red"
    with pytest.raises(ValueError, match="give a text"):
        rerank_text([Term(1.0, "id", 3)])


def test_a_real_reranker_scores_files_as_their_images_and_caches_them(indexed):
    clip, db, _ = indexed
    torch.manual_seed(0)
    model = Reranker.from_clip(load(clip), RerankerConfig(width=16, layers=1, heads=2)).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    scorer = SearchReranker(model)
    with Index.open(db) as ix:
        rows = list(ix.store.get([r.id for r in ix.search("a green star", k=5)]).values())
    got = scorer.score_files("a green star", rows)
    assert scorer.last_timing["encoded"] == 5
    want = model.score("a green star", [Image.open(r.path).convert("RGB") for r in rows]).numpy()
    assert np.allclose(got, want, atol=1e-4)
    again = scorer.score_files("a green star", rows)
    assert scorer.last_timing["cached"] == 5 and np.allclose(again, got)


def test_search_rerank_on_the_command_line(indexed, tmp_path, capsys):
    from mmfusion.cli.main import main

    clip, db, _ = indexed
    save_model(Reranker.from_clip(load(clip), RerankerConfig(width=16, layers=1, heads=2)), tmp_path / "rr")
    assert main(["search", "a red circle", "--db", str(db), "--rerank", str(tmp_path / "rr"), "-k", "3",
                 "--rerank-k", "6", "--json"]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 3 and all("similarity" in r for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert main(["search", "--like", str(results[0]["id"]), "--db", str(db), "--rerank", str(tmp_path / "rr")]) == 2
    assert "give a text" in capsys.readouterr().err


def test_videos_keep_their_place_and_are_never_decoded_as_images():
    from mmfusion.index.query import SearchResult
    from mmfusion.index.store import FileRow

    def row(i: int, fmt: str) -> FileRow:
        ext = "mp4" if fmt.startswith("video/") else "png"
        return FileRow(i, f"/x/f{i:02d}.{ext}", f"f{i:02d}.{ext}", "/x", 1, 1, b"h", 8, 8, fmt, None, 0.0)

    formats = {1: "PNG", 2: "video/mp4", 3: "PNG", 4: "PNG", 5: "video/mp4", 6: "PNG"}
    rows = {i: row(i, f) for i, f in formats.items()}
    first = [SearchResult.from_row(rows[i], 1.0 - i / 10) for i in formats]
    stub = PrefersNames()  # prefers higher numbers: 6, 4, 3, 1 among the images
    got = rerank_results(stub, rows, "a red circle", first)
    assert stub.seen == [("a red circle", [1, 3, 4, 6])]  # the videos were not sent to the re-ranker
    assert [r.id for r in got] == [6, 2, 4, 3, 5, 1]  # videos at their places 2 and 5, images re-ordered around them
    assert got[1] == first[1] and got[4] == first[4]  # a video keeps its first-stage score and metadata
