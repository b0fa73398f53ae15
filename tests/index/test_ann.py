import numpy as np
import pytest

from mmfusion.index.ann import AnnConfig, VectorIndex


def _clustered(n, dim=32, clusters=20, seed=0, world=0):
    c = np.random.default_rng(world).standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    x = c[rng.integers(clusters, size=n)] + 0.7 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_search_is_exact_and_keyed_by_ids():
    x = _clustered(500)
    ids = np.arange(500) * 10 + 7
    vi = VectorIndex(32)
    vi.add(ids, x)
    q = _clustered(5, seed=1)
    scores, got = vi.search(q, 10)
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(got, ids[ref])
    assert np.allclose(scores, np.take_along_axis(q @ x.T, ref, 1), atol=1e-5)
    assert vi.kind == "flat"


def test_remove_filters_and_missing_results():
    x = _clustered(50)
    vi = VectorIndex(32)
    vi.add(np.arange(50), x)
    assert vi.remove([3, 4, 999]) == 2
    assert sorted(vi.ids().tolist()) == [i for i in range(50) if i not in (3, 4)]
    _, got = vi.search(x[3:4], 5)
    assert 3 not in got
    scores, got = vi.search(x[:1], 5, allowed=[0, 1])
    assert set(got[0][:2]) == {0, 1} and (got[0][2:] == -1).all() and np.isinf(scores[0][2:]).all()


def test_ivf_layout_keeps_recall_and_returns_exact_scores(tmp_path):
    x = _clustered(6000, seed=2)
    vi = VectorIndex(32, AnnConfig(ivf_threshold=2000))
    vi.add(np.arange(6000), x)
    assert vi.needs_rebuild()
    vi.rebuild()
    assert vi.kind.startswith("ivf") and vi.nprobe >= 1
    q = _clustered(200, seed=3)
    scores, got = vi.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)])
    assert recall >= 0.95
    assert np.allclose(scores, np.einsum("qd,qkd->qk", q, x[got]), atol=1e-5)  # re-ranked: exact scores
    # adds and removes reach both layouts; a save/load round trip keeps the layout and its tuning
    vi.remove(np.arange(100))
    vi.add(np.arange(10_000, 10_010), x[:10])
    path = tmp_path / "v.faiss"
    vi.save(path)
    back = VectorIndex.load(path, vi.cfg)
    assert back.kind == vi.kind and len(back) == len(vi) == 5910
    assert np.array_equal(back.search(q, 10)[1], vi.search(q, 10)[1])
    assert not list(tmp_path.glob(".*tmp"))


def test_shrinking_returns_to_exact_search():
    x = _clustered(3000)
    vi = VectorIndex(32, AnnConfig(ivf_threshold=2000))
    vi.add(np.arange(3000), x)
    vi.rebuild()
    vi.remove(np.arange(2500))
    assert vi.needs_rebuild()
    vi.rebuild()
    assert vi.kind == "flat"


def test_bad_shapes_are_refused():
    vi = VectorIndex(8)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        vi.add([1], np.zeros((1, 9)))
    with pytest.raises(ValueError, match="ids for"):
        vi.add([1, 2], np.zeros((1, 8)))
