"""The index's SQLite store across schema versions: a newer index is refused untouched, a reader of schema 1 sees
the segments a writer adds later, and a writer drops segments whose video row is gone."""

from __future__ import annotations

import sqlite3

import pytest

pytest.importorskip("av")

from mmfusion.index import Index  # noqa: E402
from mmfusion.index.store import DB_FILE, IndexSchemaError, Store  # noqa: E402
from tests.index.test_video_search import N_VIDEOS, gallery, index_videos  # noqa: E402,F401


def _set_schema(db_dir, version: int, drop_segments: bool = False) -> None:
    db = sqlite3.connect(db_dir / DB_FILE)
    if drop_segments:
        db.executescript("DROP TABLE segments; DELETE FROM sqlite_sequence WHERE name = 'segments';")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(version),))
    db.commit()
    db.execute("PRAGMA journal_mode = DELETE")  # no -wal beside it: the file alone is the whole database
    db.close()


class _Tracked(sqlite3.Connection):
    closed: list[bool] = []

    def close(self) -> None:
        _Tracked.closed.append(True)
        super().close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_newer_schema_is_refused_leaving_the_file_byte_identical(tmp_path, monkeypatch, readonly):
    Store(tmp_path / "db").close()
    _set_schema(tmp_path / "db", 99)
    path = tmp_path / "db" / DB_FILE
    before = path.read_bytes()
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real(*a, factory=_Tracked, **kw))
    _Tracked.closed.clear()
    with pytest.raises(IndexSchemaError, match="newer mmfusion .*schema 99.*pip install -U mmfusion"):
        Store(tmp_path / "db", readonly=readonly)
    assert _Tracked.closed == [True]  # the refused connection is closed, not left to the garbage collector
    assert path.read_bytes() == before
    assert not (tmp_path / "db" / f"{DB_FILE}-wal").exists() or readonly  # no WAL switch by a refused writer


def test_a_schema_1_reader_sees_the_segments_a_writer_adds_later(gallery):  # noqa: F811
    root, folder, _ = gallery
    index_videos(root, folder.parent / "nothing")  # an empty index
    _set_schema(root / "db", 1, drop_segments=True)
    reader = Store(root / "db", readonly=True)
    try:
        assert not reader.has_segments() and reader.video_counts() == {"videos": 0, "segments": 0}
        assert index_videos(root, folder).added == N_VIDEOS  # a writer migrates the index while the reader is open
        assert reader.has_segments()  # the real table, not an empty stand-in shadowing it
        counts = reader.video_counts()
        assert counts["videos"] == N_VIDEOS and counts["segments"] >= N_VIDEOS
        assert len(reader.ids()) == counts["segments"]
    finally:
        reader.close()


def test_a_writer_drops_segments_whose_video_row_is_gone(gallery):  # noqa: F811
    root, folder, _ = gallery
    index_videos(root, folder)
    db = sqlite3.connect(root / "db" / DB_FILE)
    (victim,) = db.execute("SELECT id FROM files ORDER BY id LIMIT 1").fetchone()
    orphans = {r[0] for r in db.execute("SELECT id FROM segments WHERE file_id = ?", (victim,))}
    db.execute("DELETE FROM files WHERE id = ?", (victim,))  # as an older mmfusion deletes: segments left behind
    db.commit()
    db.close()
    assert orphans
    with Index.open(root / "db", write=True) as ix:
        assert not orphans & set(ix.store.segments(ids=orphans))
        assert not orphans & set(ix.store.ids().tolist())
        assert ix.check().ok  # the vector store dropped them too
    with Index.open(root / "db") as ix:
        assert ix.check().ok and ix.store.video_counts()["videos"] == N_VIDEOS - 1
