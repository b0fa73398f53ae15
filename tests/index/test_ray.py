"""Indexing and embedding on Ray (a local cluster of 2 CPUs that these tests start and stop): the same rows and
vectors as the plain indexer, no row lost or doubled when an actor dies, a killed driver resumed, and shards."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from mmfusion.cli.main import main
from mmfusion.index import Index
from mmfusion.index.collection import load_embedder
from mmfusion.index.ray_embed import RayOptions
from mmfusion.index.shards import read_manifest, shard_paths
from tests.index import ray_helpers
from tests.utils import photo, tiny_clip

ray = pytest.importorskip("ray", reason="Ray is a dev dependency: pip install -e '.[dev]'")
N = 300


@pytest.fixture(scope="module")
def cluster():
    """A local Ray of 2 CPUs for this module; models defined in tests travel to it by value."""
    cloudpickle.register_pickle_by_value(ray_helpers)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(ray_helpers)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """300 photos, a copy of one, an unreadable file, a tiny CLIP, and the plain indexer's index of them."""
    root = tmp_path_factory.mktemp("ray")
    model = tiny_clip(root / "clip")
    folder = root / "photos"
    for i in range(N):
        photo(folder / f"p{i:04d}.jpg", (48 + i % 5, 32 + i % 3), seed=i)
    photo(folder / "copy.jpg", (48, 32), seed=0)  # the content of p0000.jpg
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    with Index.open(root / "plain", model=model, write=True) as ix:
        report = ix.update([folder], progress=False)
    return root, model, folder, report


def _rows(db: Path) -> dict[str, tuple]:
    """path -> (hash, width, height, format, taken, vector) of every row of an index."""
    with Index.open(db) as ix:
        rows = ix.store.get(ix.store.ids().tolist())
        ids, vecs = ix.store.vectors(list(rows))
        by_id = dict(zip(ids.tolist(), vecs))
        paths = [r.path for r in rows.values()]
        assert len(paths) == len(set(paths)), "a path indexed twice"
        return {r.path: (r.hash, r.width, r.height, r.format, r.taken, by_id[i]) for i, r in rows.items()}


def _same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for path, ra in a.items():
        rb = b[path]
        assert ra[:5] == rb[:5], path
        cos = float(ra[5] @ rb[5] / np.linalg.norm(ra[5]) / np.linalg.norm(rb[5]))
        assert cos >= 0.9999, (path, cos)


def test_ray_index_equals_the_plain_indexer(cluster, world, tmp_path):
    root, model, folder, plain = world
    with Index.open(tmp_path / "db", model=model, write=True) as ix:
        report = ix.update([folder], progress=False, batch_size=16, ray=RayOptions(actors=1))
    assert (report.added, report.duplicates, report.skipped) == (plain.added, plain.duplicates, plain.skipped)
    assert report.added == N and report.duplicates == 1
    assert [p for p, _ in report.skipped] == [str(folder / "broken.jpg")]
    _same_rows(_rows(tmp_path / "db"), _rows(root / "plain"))
    with Index.open(tmp_path / "db", write=True) as ix:  # a second run through Ray: nothing to do
        again = ix.update([folder], progress=False, ray=RayOptions(actors=1))
    assert again.model_calls == 0 and again.unchanged == N + 1 and again.added == 0


def test_an_actor_killed_mid_run_loses_and_doubles_nothing(cluster, world, tmp_path):
    root, model, folder, _ = world
    marker = tmp_path / "killed"
    dying = ray_helpers.Wrapped(load_embedder(model), marker=marker, die_at=3)
    with Index.open(tmp_path / "db", model=dying, write=True) as ix:
        report = ix.update([folder], progress=False, batch_size=16, ray=RayOptions(actors=2))
    assert marker.exists(), "the actor was never killed: the test proved nothing"
    assert report.added == N and report.duplicates == 1
    _same_rows(_rows(tmp_path / "db"), _rows(root / "plain"))


DRIVER = """
import sys, cloudpickle
from mmfusion.index import Index
from mmfusion.index.collection import load_embedder
from mmfusion.index.ray_embed import RayOptions
from tests.index import ray_helpers
cloudpickle.register_pickle_by_value(ray_helpers)
db, model, folder = sys.argv[1:4]
with Index.open(db, model=model, write=True) as ix:  # records the model's path; embeds with a slow copy
    ix.bind_model(ray_helpers.Wrapped(load_embedder(model), stall_after=24, stall_s=5))  # after 3 blocks of 32
    ix.update([folder], batch_size=4, chunk_size=8, commit_every_s=0, progress=False,
              ray=RayOptions(actors=1, num_cpus=2))
"""


def _count(db: Path) -> int:
    if not (db / "index.sqlite").exists():
        return 0
    con = sqlite3.connect(db / "index.sqlite", timeout=5)
    try:
        return con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        con.close()


def test_a_killed_driver_rerun_embeds_only_the_rest(world, tmp_path):
    """The driver (with the local Ray it started) SIGKILLed once it has committed; the rerun embeds the rest."""
    root, model, folder, _ = world
    db = tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(db), str(model), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).parents[2],
        start_new_session=True,  # its own process group: the local Ray it starts goes with it at the end
    )
    deadline = time.monotonic() + 240
    while _count(db) == 0:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the driver committed nothing in 4 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the driver alone, as a crash would; Ray's processes see it gone
    proc.wait()
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):  # then whatever Ray left of that session
        os.killpg(proc.pid, signal.SIGKILL)
    committed = _count(db)
    assert 0 < committed < N, "the kill did not land mid-run"
    with Index.open(db, write=True) as ix:  # without Ray this time: what was not committed, and only that
        report = ix.update([folder], progress=False)
    assert report.model_calls == N + 1 - committed  # the rest (the 300 photos and the copy), nothing twice
    _same_rows(_rows(db), _rows(root / "plain"))


def test_embed_then_index_from_embeddings_equals_direct_indexing(cluster, world, tmp_path, capsys):
    root, model, folder, _ = world
    out, db = tmp_path / "emb", tmp_path / "db"
    argv = ["embed", str(folder), "--model", str(model), "--out", str(out), "--shard-size", "64", "--ray"]
    assert main(argv) == 0
    assert len(shard_paths(out)) == 5  # 302 files in shards of 64
    assert read_manifest(out)["model"]["fingerprint"] == _fingerprint(model)
    assert main(["index", "--from-embeddings", str(out), "--db", str(db)]) == 0
    _same_rows(_rows(db), _rows(root / "plain"))
    with Index.open(db) as ix:  # the index loads its model from the manifest's reference to search
        assert ix.search(text="a red circle", k=3)


def _fingerprint(model_dir: Path) -> str:
    from mmfusion.backends import model_fingerprint

    return model_fingerprint(load_embedder(model_dir))
