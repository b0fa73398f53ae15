"""Vectors in Milvus, through milvus-lite (the same client code as a server): equal to FAISS flat, filters,
deletes and renames, the recorded spec, and errors that name the fix. Each test keeps its own .db in tmp_path."""

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="vectors in Milvus need pymilvus: pip install 'mmfusion[milvus]'")

from mmfusion.cli.main import main  # noqa: E402
from mmfusion.index import Index, VectorIndex  # noqa: E402
from mmfusion.index import milvus as milvus_mod  # noqa: E402
from mmfusion.index.vectors import VectorStore, parse_vectors_spec  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.utils import photo, tiny_clip  # noqa: E402


def _unit(rng, n, dim=64):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


@pytest.fixture
def lite(tmp_path):
    """A MilvusVectors on a fresh milvus-lite file (dim 64), closed after the test."""
    stores = []

    def make(dim=64, owner="test", collection="vecs", create=True, **params):
        from mmfusion.index.vectors import open_milvus

        spec = parse_vectors_spec(f"{tmp_path / 'vectors.db'}/{collection}")
        store = open_milvus(spec, dim, owner, create)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def test_both_engines_satisfy_the_interface(lite):
    assert isinstance(VectorIndex(8), VectorStore) and isinstance(lite(), VectorStore)


def test_recall_and_exact_equality_with_faiss_flat(lite):
    rng = np.random.default_rng(0)
    vecs, queries = _unit(rng, 2000), _unit(rng, 100)
    ids = np.arange(1, 2001, dtype=np.int64) * 3  # not 0..n-1: ids are the files' ids
    mv, fv = lite(), VectorIndex(64)
    mv.add(ids, vecs)
    fv.add(ids, vecs)
    truth = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :10]]  # exact search by brute force
    m_scores, m_ids = mv.search(queries, 10)
    f_scores, f_ids = fv.search(queries, 10)
    assert _recall(m_ids, truth) >= 0.99
    assert np.array_equal(m_ids, f_ids)  # FLAT on milvus-lite is exact: the same ranking as FAISS flat
    assert np.allclose(m_scores, f_scores, atol=1e-5)
    # negative control: the measure fails a ranking that is not exact
    assert _recall(np.roll(m_ids, 1, axis=0), truth) < 0.5
    # a small clean set: ids equal, k past the collection's size pads like FAISS
    mv.remove(ids[20:])
    fv.remove(ids[20:])
    assert np.array_equal(mv.search(queries, 25)[1], fv.search(queries, 25)[1])
    assert (mv.search(queries, 25)[1][:, 20:] == -1).all()


def test_filters_equal_faiss(lite, monkeypatch):
    rng = np.random.default_rng(1)
    vecs, queries = _unit(rng, 600), _unit(rng, 8)
    ids = np.arange(100, 700, dtype=np.int64)
    mv, fv = lite(), VectorIndex(64)
    mv.add(ids, vecs)
    fv.add(ids, vecs)
    few, most = ids[::7], ids[ids % 10 != 3]
    for allowed in (few, most, ids[:3], np.array([99_999], np.int64)):
        assert np.array_equal(mv.search(queries, 10, allowed)[1], fv.search(queries, 10, allowed)[1])
    monkeypatch.setattr(milvus_mod, "FILTER_CHUNK", 16)  # large sets: chunked expressions, merged
    for allowed in (few, ids[::2]):
        assert np.array_equal(mv.search(queries, 10, allowed)[1], fv.search(queries, 10, allowed)[1])
    monkeypatch.setattr(milvus_mod, "POST_FILTER_SHARE", 0.5)  # most of the collection: post-filtered
    assert np.array_equal(mv.search(queries, 10, most)[1], fv.search(queries, 10, most)[1])
    assert (mv.search(queries, 5, np.zeros(0, np.int64))[1] == -1).all()


def test_upserts_are_idempotent_deletes_and_reads(lite):
    rng = np.random.default_rng(2)
    vecs = _unit(rng, 50)
    mv = lite()
    mv.add(np.arange(50), vecs)
    mv.add(np.arange(10), vecs[:10])  # a replayed chunk
    assert len(mv) == 50 and np.array_equal(mv.ids(), np.arange(50))
    mv.add([3], vecs[4:5])  # an upsert replaces
    assert np.allclose(mv.vectors([3, 7]), vecs[[4, 7]])
    assert mv.remove([1, 2, 49]) == 3 and len(mv) == 47
    assert 2 not in mv.ids() and 3 in mv.ids()
    with pytest.raises(KeyError):
        mv.vectors([2])


def test_ids_reads_sparse_and_dense_windows(lite, monkeypatch):
    monkeypatch.setattr(milvus_mod, "MAX_TOPK", 64)  # small windows, so both widening and narrowing happen
    ids = np.concatenate([np.arange(0, 300), np.arange(10_000, 10_050), [1_000_000]]).astype(np.int64)
    mv = lite(dim=4)
    mv.add(ids, _unit(np.random.default_rng(3), len(ids), 4))
    assert np.array_equal(mv.ids(), ids)


def test_a_collection_belongs_to_one_index(lite):
    lite(owner="index-a")
    with pytest.raises(ValueError, match="belongs to another index"):
        lite(owner="index-b")
    with pytest.raises(FileNotFoundError, match="mmfusion index rebuild"):
        lite(collection="missing", create=False)


def test_pymilvus_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mmfusion\[milvus\]'"):
        milvus_mod.MilvusVectors(str(tmp_path / "v.db"), "vecs", 4, owner="x", create=True)


_HELD: list = []  # ports held to the end of the session (see below)


def test_a_server_that_is_not_there_is_a_clear_error():
    import socket

    # a loopback port that nothing listens on, and that nothing else may take for the rest of the session: the
    # failed client's gRPC channel keeps reconnecting in the background, and a later test's listener on the same
    # port (gloo's, in the two-process loss tests) would receive its HTTP/2 bytes and abort
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    port = sock.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"cannot open the Milvus server at http://127.0.0.1:{port}"):
        milvus_mod.MilvusVectors(f"http://127.0.0.1:{port}", "vecs", 4, owner="x")


@pytest.mark.parametrize(
    "spec,fix",
    [
        ("milvus://localhost/photos", "milvus://HOST:PORT/COLLECTION"),
        ("milvus://user:pw@localhost:19530/photos", "MMFUSION_MILVUS_TOKEN"),
        ("redis://localhost:6379/0", "milvus-lite:PATH.db"),
        ("vectors.db/my-photos", "letters, digits and underscores"),
        ("milvus://localhost:19530/photos?ef=lots", "whole number"),
    ],
)
def test_bad_specs_say_what_to_write(spec, fix):
    with pytest.raises(ValueError, match="--vectors") as e:
        parse_vectors_spec(spec)
    assert fix in str(e.value)


def test_spec_forms(tmp_path):
    p = tmp_path / "v.db"
    assert parse_vectors_spec(f"milvus-lite:{p}/photos") == parse_vectors_spec(f"{p}/photos")
    assert parse_vectors_spec(str(p)).collection == "images"
    server = parse_vectors_spec("milvus://milvus.svc:19530/photos?index=hnsw&ef=64")
    assert (server.uri, server.collection, dict(server.options)) == (
        "http://milvus.svc:19530", "photos", {"index": "HNSW", "ef": 64},
    )  # fmt: skip
    assert parse_vectors_spec(server.text) == server and parse_vectors_spec("faiss").kind == "faiss"
    assert ServeSettings.load(env={"MMFUSION_VECTORS": "milvus://m:19530/photos"}).vectors == "milvus://m:19530/photos"


# ---- the index, end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model") / "clip")


def _folder(root, n=10):
    for i in range(n):
        photo(root / f"img{i:03d}.{'png' if i % 2 else 'jpg'}", seed=i)
    return root


def _ranked(ix, text="a red circle", k=10, **filters):
    return [(r.path, round(r.score, 4)) for r in ix.search(text=text, k=k, **filters)]


def test_index_in_milvus_searches_as_faiss_and_follows_deletes_and_renames(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos")
    spec = f"{tmp_path / 'vectors.db'}/photos"
    with Index.open(tmp_path / "faiss", model=model_dir, write=True) as fx:
        fx.update([photos], progress=False)
    with Index.open(tmp_path / "db", model=model_dir, write=True, vectors=spec) as ix:
        ix.update([photos], progress=False)
        assert ix.info()["vectors"] == f"milvus-lite:{tmp_path / 'vectors.db'}/photos"
        assert ix.check(full=True).problems == []
        assert not (tmp_path / "db" / "vectors.faiss").exists()
    with Index.open(tmp_path / "db") as ix, Index.open(tmp_path / "faiss") as fx:  # the spec is recorded
        assert "milvus-lite" in ix.info()["index_type"]
        assert _ranked(ix) == _ranked(fx)
        assert _ranked(ix, path="*.png", k=3) == _ranked(fx, path="*.png", k=3)
        moved_id = ix.store.stats_by_path()[str(photos / "img003.png")][0]
    os.unlink(photos / "img004.jpg")
    os.rename(photos / "img003.png", photos / "moved.png")
    with Index.open(tmp_path / "db", write=True) as ix:
        r = ix.update([photos], progress=False)
        assert (r.removed, r.renamed, r.model_calls) == (1, 1, 0)
        assert np.array_equal(ix.vi.ids(), ix.store.ids())  # the delete reached Milvus
    with Index.open(tmp_path / "db") as ix:
        paths = {r.path: r.id for r in ix.search(text="a red circle", k=20)}
        assert str(photos / "img004.jpg") not in paths and str(photos / "img003.png") not in paths
        assert paths[str(photos / "moved.png")] == moved_id  # a rename keeps its id (and its vector)
        assert [r.path for r in ix.search(text="x", k=5, path="*moved*")] == [str(photos / "moved.png")]


def test_recorded_store_mismatch_repair_and_rebuild(tmp_path, model_dir):
    photos = _folder(tmp_path / "photos", 6)
    spec = f"{tmp_path / 'vectors.db'}/photos"
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:  # FAISS, the default
        ix.update([photos], progress=False)
        before = _ranked(ix)
    with pytest.raises(ValueError, match="mmfusion index rebuild --db"):
        Index.open(tmp_path / "db", vectors=spec)  # it holds FAISS vectors: moving them is explicit
    with Index.open(tmp_path / "db", write=True) as ix:
        assert ix.rebuild_vectors(spec) == 6
    with Index.open(tmp_path / "db") as ix:
        assert ix.vectors_spec.kind == "milvus-lite" and _ranked(ix) == before
        ix.vi.remove(ix.store.ids()[:2])  # vectors lost from the collection (as a crash could leave)
    with pytest.raises(ValueError, match="keeps its vectors in milvus-lite"):
        Index.open(tmp_path / "db", vectors="faiss")
    with Index.open(tmp_path / "db") as ix:  # a reader never writes to the shared collection
        assert len(ix.vi) == 4 and len(ix.search(text="x", k=10)) == 4
    with Index.open(tmp_path / "db", write=True) as ix:  # the writer repairs Milvus from SQLite on opening
        assert len(ix.vi) == 6 and _ranked(ix) == before
        assert ix.rebuild_vectors("faiss") == 6
    with Index.open(tmp_path / "db") as ix:
        assert ix.vectors_spec.kind == "faiss" and (tmp_path / "db" / "vectors.faiss").exists()
        assert _ranked(ix) == before


def test_cli_records_the_spec_and_reports_bad_ones(tmp_path, model_dir, capsys):
    photos, db = _folder(tmp_path / "photos", 6), str(tmp_path / "db")
    lite_db = str(tmp_path / "vectors.db")
    args = ["-q", "index", str(photos), "--model", str(model_dir), "--db", db, "--vectors", f"{lite_db}/pics"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["search", "a red circle", "--db", db, "--json", "-k", "3"]) == 0  # no --vectors: recorded
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["index", "info", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vectors"] == f"milvus-lite:{lite_db}/pics"
    assert main(["search", "red", "--db", db, "--vectors", "milvus://nohost/pics"]) == 2
    assert "milvus://HOST:PORT/COLLECTION" in capsys.readouterr().err
    assert main(["search", "red", "--db", db, "--vectors", f"{lite_db}/other"]) == 2
    assert "mmfusion index rebuild" in capsys.readouterr().err
    assert main(["-q", "index", "check", "--db", db]) == 0  # a full check reads every vector back from Milvus
    assert "index is consistent" in capsys.readouterr().out
    assert main(["-q", "index", "rebuild", "--db", db, "--vectors", "faiss"]) == 0
    assert "rebuilt 6 vectors from the database into faiss" in capsys.readouterr().out


def test_the_service_searches_milvus_as_the_cli_does(tmp_path, model_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmfusion.serve.app import create_app
    from tests.serve.conftest import LOCAL

    photos, spec = _folder(tmp_path / "photos", 8), f"milvus-lite:{tmp_path / 'vectors.db'}/photos"
    with Index.open(tmp_path / "faiss", model=model_dir, write=True) as fx:
        fx.update([photos], progress=False)
        want = [(r.id, r.score) for r in fx.search(text="a red circle", k=5)]  # ids: both indexes scan alike
    with Index.open(tmp_path / "db", model=model_dir, write=True, vectors=spec) as ix:
        ix.update([photos], progress=False)
    with TestClient(create_app(ServeSettings(db=str(tmp_path / "db"), vectors=spec)), base_url=LOCAL) as c:
        res = c.post("/search", json={"text": "a red circle", "k": 5})
        assert c.get("/healthz").status_code == 200
    assert res.status_code == 200, res.text
    got = [(r["id"], r["score"]) for r in res.json()["results"]]
    assert [p for p, _ in got] == [p for p, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
