"""Kill the indexer with SIGKILL at random points; the index must reopen consistent and finish the job."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from mmfusion.index import Index
from tests.utils import photo, tiny_clip

DRIVER = """
import sys, time
from mmfusion.index import Index
db, model, folder = sys.argv[1:4]
with Index.open(db, model=model, write=True) as ix:
    embed = ix.query_encoder.encode_pixels
    def slow_embed(*a, **k):  # a real model takes this long per batch; gives the kills work to land in
        time.sleep(0.08)
        return embed(*a, **k)
    ix.query_encoder.encode_pixels = slow_embed
    print("ready", flush=True)
    r = ix.update([folder], batch_size=4, chunk_size=3, commit_every_s=0, save_every_s=0, workers=2,
                  progress=False)
print("done", r.added + r.renamed + r.duplicates + r.updated, flush=True)
"""


def _run(args, kill_after: float | None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    if kill_after is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        return out.decode()
    assert proc.stdout.readline().decode().strip() == "ready", proc.stderr.read().decode()
    time.sleep(kill_after)  # counted from the start of the update, not from interpreter start-up
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return None


def _consistent(db):
    con = sqlite3.connect(str(db / "index.sqlite"))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with Index.open(db, write=True) as ix:  # opening repairs FAISS from SQLite if it was behind
        report = ix.check(full=True)
        assert report.problems == [], report.problems
        fa, sq = np.sort(ix.vi.ids()), ix.store.ids()
        assert np.array_equal(fa, sq) and len(np.unique(fa)) == len(fa)
        return ix.store.count()


def test_sigkill_at_random_points_never_corrupts(tmp_path):
    model = tiny_clip(tmp_path / "clip")
    folder, db = tmp_path / "photos", tmp_path / "db"
    rng = np.random.default_rng(0)
    made = mid_run = 0
    for i in range(40):
        photo(folder / f"p{i:04d}.jpg", (96, 64), seed=made)
        made += 1
    for round_ in range(20):
        # the folder changes between runs, so every run has new, renamed and removed files to commit
        for _ in range(12):
            photo(folder / f"p{made:04d}.jpg", (96, 64), seed=made)
            made += 1
        files = sorted(folder.iterdir())
        os.rename(files[int(rng.integers(len(files)))], folder / f"renamed{round_}.jpg")
        os.unlink(files[int(rng.integers(len(files)))]) if len(files) > 30 else None
        _run([db, model, folder], kill_after=float(rng.uniform(0.0, 0.8)))
        if (db / "index.sqlite").exists():
            n = _consistent(db)
            mid_run += 0 < n != len(list(folder.iterdir()))
    print(f"{mid_run} of 20 kills landed while the run had work left")
    assert mid_run >= 5  # the kills did land mid-run, not only before or after the work
    out = _run([db, model, folder], kill_after=None)
    assert out.splitlines()[-1].startswith("done")
    n_files = len([p for p in folder.iterdir()])
    assert _consistent(db) == n_files
    with Index.open(db) as ix:
        paths = {r.path for r in ix.store.get(ix.store.ids()).values()}
        assert paths == {str(p) for p in folder.iterdir()}


@pytest.mark.parametrize("cut", ["faiss", "tmp"])
def test_damaged_or_stale_vector_file_is_rebuilt(tmp_path, cut):
    model = tiny_clip(tmp_path / "clip")
    for i in range(6):
        photo(tmp_path / "photos" / f"{i}.png", seed=i)
    with Index.open(tmp_path / "db", model=model, write=True) as ix:
        ix.update([tmp_path / "photos"], progress=False)
    vf = tmp_path / "db" / "vectors.faiss"
    if cut == "faiss":
        vf.write_bytes(vf.read_bytes()[:100])  # a torn file (as from a disk error)
    else:
        (tmp_path / "db" / ".vectors.faiss.abc.tmp").write_bytes(b"half a save")
    with Index.open(tmp_path / "db", write=True) as ix:
        assert ix.check(full=True).problems == []
        assert len(ix.search(text="a red circle", k=10)) == 6
    assert not list((tmp_path / "db").glob(".*.tmp"))
