"""Published snapshots: atomic publish, readers that hot-swap with leases, garbage collection that spares held
versions, and Redis announcements that beat the poll."""

import json
import os
import shutil
import sqlite3
import time

import pytest

from mmfusion.index import Index
from mmfusion.index import snapshots as snap
from mmfusion.index.snapshots import SnapshotReader, gc, publish, read_pointer, versions
from tests.redis_server import redis_server, redis_url  # noqa: F401 (fixtures: a real redis-server)
from tests.utils import photo, tiny_clip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("snapclip") / "clip")


@pytest.fixture
def db(tmp_path, model):
    """An index of 4 photos, published as v1."""
    for i in range(4):
        photo(tmp_path / "photos" / f"p{i}.png", seed=i)
    with Index.open(tmp_path / "db", model=model, write=True) as ix:
        ix.update([tmp_path / "photos"], progress=False)
        assert publish(ix).version == 1
    return tmp_path / "db"


def add_and_publish(db, name: str, seed: int, **kw) -> int:
    photo(db.parent / "photos" / name, seed=seed)
    with Index.open(db, write=True) as ix:
        ix.update([db.parent / "photos"], progress=False)
        return publish(ix, **kw).version


def wait_for(cond, timeout: float) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_snapshot_is_self_contained_and_searches_like_the_index(db):
    assert sorted(os.listdir(db / "snapshots" / "v1")) == ["SNAPSHOT.json", "index.sqlite", "vectors.faiss"]
    con = sqlite3.connect(db / "snapshots" / "v1" / "index.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, no -wal to copy along
    con.close()
    assert (db / "snapshots" / "CURRENT").read_text() == "v1\n"
    with Index.open(db) as live, SnapshotReader.open(db, watch=False) as reader:
        want = [(r.id, r.path, round(r.score, 6)) for r in live.search(text="a red circle", k=4)]
        got = [(r.id, r.path, round(r.score, 6)) for r in reader.search(text="a red circle", k=4)]
        assert got == want and len(got) == 4
        assert reader.store.count() == 4 and reader.info()["snapshot"] == 1 and reader.version == 1
    assert not list((db / "snapshots" / "v1").glob("*-journal"))  # the reader wrote nothing into the snapshot


def test_a_crash_before_the_switch_leaves_the_old_version_current(db, monkeypatch):
    with SnapshotReader.open(db, watch=False) as reader:
        monkeypatch.setattr(snap, "_switch", lambda root, v: (_ for _ in ()).throw(OSError("power cut")))
        with pytest.raises(OSError, match="power cut"):
            add_and_publish(db, "new.png", 9)
        assert read_pointer(db) == 1 and versions(db) == [1, 2]  # v2 complete on disk, but never named
        assert not reader.refresh() and reader.store.count() == 4
        monkeypatch.undo()
        # a publish cut short while writing leaves neither a version nor its temporary directory
        monkeypatch.setattr("mmfusion.index.ann.VectorIndex.save", lambda self, path: 1 / 0)
        with Index.open(db, write=True) as ix, pytest.raises(ZeroDivisionError):
            publish(ix)
        assert versions(db) == [1, 2] and not list((db / "snapshots").glob(".tmp-*"))
        monkeypatch.undo()
        with Index.open(db, write=True) as ix:
            assert publish(ix).version == 3  # a name a crash left behind is never reused
        assert reader.refresh() and reader.version == 3 and reader.store.count() == 5


def test_a_half_written_or_unknown_version_is_never_opened(db):
    root = db / "snapshots"
    (root / ".tmp-v7-123").mkdir()  # what a crash mid-write leaves
    (root / ".tmp-v7-123" / "index.sqlite").write_bytes(b"garbage")
    shutil.copytree(root / "v1", root / "v8")
    (root / "v8" / "SNAPSHOT.json").unlink()  # incomplete: the manifest is written last
    with SnapshotReader.open(db, watch=False) as reader:
        for pointer in ("v7\n", "v8\n", "v99\n", "latest\n"):
            (root / "CURRENT").write_text(pointer)
            assert not reader.refresh() and reader.version == 1 and reader.store.count() == 4
        (root / "CURRENT").write_text("v1\n")
        with Index.open(db, write=True) as ix:
            assert publish(ix).version == 9
        assert not (root / ".tmp-v7-123").exists()  # the next publish clears what a crash left
        assert reader.refresh() and reader.version == 9


def test_a_lease_keeps_its_version_open_across_a_swap(db):
    with SnapshotReader.open(db, watch=False) as reader:
        with reader.lease() as old:
            add_and_publish(db, "new.png", 9)
            assert reader.refresh()
            with reader.lease() as new:
                assert new.store.count() == 5
            assert old.store.count() == 4 and len(old.search(like=1, k=10)) == 4  # still on v1, still open
        with pytest.raises(sqlite3.ProgrammingError):  # closed when its last lease ended
            old.store.count()
        assert reader.store.count() == 5


def test_gc_keeps_recent_and_held_versions(db):
    with SnapshotReader.open(db, watch=False) as reader:  # holds v1
        for i in range(2, 6):
            add_and_publish(db, f"n{i}.png", i, keep=1, grace_s=3600)
        assert versions(db) == [1, 2, 3, 4, 5]  # within the grace period nothing goes
        assert gc(db, keep=1, grace_s=0) == [2, 3]  # v1 is held by the reader, v4 is the one kept before v5
        assert versions(db) == [1, 4, 5]
        assert reader.refresh() and reader.version == 5  # v1 closed: nobody holds it any more
        assert gc(db, keep=1, grace_s=0) == [1]
        assert gc(db, keep=0, grace_s=0) == [4] and versions(db) == [5]


def test_a_watching_reader_sees_a_new_version_within_5_s(db):
    with SnapshotReader.open(db, poll_s=0.2) as reader:
        add_and_publish(db, "new.png", 9)
        wait_for(lambda: reader.version == 2, 5)
        assert reader.store.count() == 5


# ---- Redis announcements ---------------------------------------------------------------------------------------


def test_a_redis_announcement_swaps_faster_than_the_poll(db, redis_url):  # noqa: F811 (the fixture)
    with SnapshotReader.open(db, poll_s=30, redis_url=redis_url) as reader:
        time.sleep(0.5)  # subscribed
        add_and_publish(db, "quiet.png", 8)  # not announced: the 30 s poll would be the only way (negative control)
        time.sleep(1.0)
        assert reader.version == 1
        add_and_publish(db, "new.png", 9, redis_url=redis_url)
        assert wait_for(lambda: reader.version == 3, 2) < 2
        assert reader.store.count() == 6


def test_an_unreachable_redis_only_logs_and_polling_goes_on(db, caplog):
    dead = "redis://127.0.0.1:1/0"
    with SnapshotReader.open(db, poll_s=0.2, redis_url=dead) as reader:
        add_and_publish(db, "new.png", 9, redis_url=dead)
        wait_for(lambda: reader.version == 2, 5)
    assert "readers find it by polling" in caplog.text


def test_the_cli_publishes_after_a_run_and_on_demand(db, capsys):
    from mmfusion.cli.main import main

    photo(db.parent / "photos" / "new.png", seed=9)
    argv = ["-q", "index", str(db.parent / "photos"), "--db", str(db), "--publish", "--keep-snapshots", "0"]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["added"] == 1  # the report stays plain JSON: the publish line goes to stderr
    assert "published snapshot v2 (5 images)" in out.err and read_pointer(db) == 2
    assert main(["index", "publish", "--db", str(db)]) == 0
    assert "published snapshot v3" in capsys.readouterr().err and read_pointer(db) == 3


def test_a_swap_trusts_the_checked_model_and_refuses_another(db, tmp_path_factory, monkeypatch):
    import mmfusion.index.collection as collection
    from mmfusion.index import load_embedder

    with Index.open(db) as ix:
        model = load_embedder(ix.store.meta("model")["ref"])
    with SnapshotReader.open(db, model, watch=False) as reader:
        hashed = []
        real = collection.model_fingerprint
        monkeypatch.setattr(collection, "model_fingerprint", lambda m: hashed.append(m) or real(m))
        add_and_publish(db, "new.png", 9)
        hashed.clear()  # the writer checked its model
        assert reader.refresh() and reader.version == 2 and hashed == []  # same recorded weights: not re-hashed
        other = tmp_path_factory.mktemp("other")  # an index of another model, put where v3 would be
        photo(other / "photos" / "o.png", seed=1)
        with Index.open(other / "db", model=tiny_clip(other / "clip", seed=1), write=True) as ix:
            ix.update([other / "photos"], progress=False)
            publish(ix)
        shutil.copytree(other / "db" / "snapshots" / "v1", db / "snapshots" / "v3")
        (db / "snapshots" / "CURRENT").write_text("v3\n")
        hashed.clear()
        assert not reader.refresh() and reader.version == 2  # an index never mixes models: v2 stays
        assert len(hashed) == 1  # another recorded model: checked, and refused
