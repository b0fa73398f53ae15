"""The index's SQLite database (the source of truth) and its one-writer lock.

SQLite in WAL mode holds every file's metadata and its vector (float32 bytes), so the FAISS structure
beside it is a cache that can always be repaired or rebuilt from here. Writes happen in transactions, one
per chunk of files, so a run that is killed keeps every chunk it committed and nothing half-done.

An id names one vector for good: a file whose content changes gets a new id (its old row goes), so a stale
FAISS entry can always be recognised by its id alone.

A video is one row of ``files`` (its ``format`` a MIME type, ``video/...``; its vector the mean of its segments')
and its time segments are rows of ``segments``, each with its own vector. The vector store holds what is searched:
an image's vector under the file's id, and a video's segments under the segments' ids, which start at
``SEGMENT_ID_BASE`` so that they never meet a file's. Schema 2 added the segments; opening an index of schema 1
for writing migrates it (the table is added, nothing else changes); a reader of schema 1 sees no segments. The
schema version is read before anything is written, so an index of a newer schema is refused untouched.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2  # 1: files; 2: + segments (video)
SEGMENT_ID_BASE = 2**52  # segments' ids start here (below 2**53, so they stay exact in JavaScript too)
VIDEO_FORMAT = "video/%"  # a video's row has its MIME type as format (images: Pillow's format name)
DB_FILE, VECTORS_FILE, LOCK_FILE = "index.sqlite", "vectors.faiss", "write.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an id always means the same vector
    path BLOB NOT NULL UNIQUE,             -- the path's exact bytes (names need not be UTF-8)
    display TEXT NOT NULL,                 -- printable path, for output and --path filters
    root TEXT NOT NULL,                    -- the indexed folder it was found under
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash BLOB NOT NULL,                    -- BLAKE2b-128 of the bytes: renames and duplicates
    width INTEGER, height INTEGER, format TEXT,
    taken REAL,                            -- EXIF capture time (unix seconds) when the photo has one
    indexed_at REAL NOT NULL,
    vector BLOB NOT NULL                   -- float32, L2-normalised
);
CREATE INDEX IF NOT EXISTS files_hash ON files (hash);
CREATE INDEX IF NOT EXISTS files_root ON files (root);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, finished REAL, report TEXT
);
"""
_SEGMENT_COLUMNS = """
    file_id INTEGER NOT NULL,              -- the video: a row of files
    start_s REAL NOT NULL, end_s REAL NOT NULL,
    thumb_s REAL NOT NULL,                 -- time of the segment's most representative frame (its thumbnail)
    vector BLOB NOT NULL                   -- float32, L2-normalised: the mean of its frames' vectors
"""
_SEGMENTS = f"""
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- from SEGMENT_ID_BASE up, never reused
    {_SEGMENT_COLUMNS});
CREATE INDEX IF NOT EXISTS segments_file ON segments (file_id);
"""
_NOT_VIDEO = "(format IS NULL OR format NOT LIKE 'video/%')"


def is_video_format(fmt: str | None) -> bool:
    """Whether a row's ``format`` marks a video (its MIME type) rather than an image (Pillow's format name)."""
    return bool(fmt) and fmt.startswith("video/")


class IndexSchemaError(RuntimeError):
    """The index was written by a newer mmfusion (a schema this version does not know)."""


@dataclass
class SegmentRow:
    """A time range of a video with its own vector: ``start_s`` to ``end_s``, thumbnail at ``thumb_s``."""

    id: int
    file_id: int
    start_s: float
    end_s: float
    thumb_s: float


class IndexLockedError(RuntimeError):
    """Another process is writing to the index."""


class IndexMismatchError(ValueError):
    """The index was made by another model (or with another vector size)."""


@dataclass
class FileRow:
    id: int
    path: str
    display: str
    root: str
    size: int
    mtime_ns: int
    hash: bytes
    width: int | None
    height: int | None
    format: str | None
    taken: float | None
    indexed_at: float


_ROW_COLS = "id, path, display, root, size, mtime_ns, hash, width, height, format, taken, indexed_at"


def _row(r: tuple) -> FileRow:
    return FileRow(r[0], os.fsdecode(r[1]), *r[2:])


class Store:
    """The SQLite side of an index directory.

    Args:
        root: the index directory.
        readonly: open without creating anything (searching).
        immutable: the file never changes while open (a published snapshot): read-only, without locks or a
            ``-shm`` file (so a read-only or network volume works), and usable from any thread.
    """

    def __init__(self, root: str | os.PathLike, readonly: bool = False, immutable: bool = False):
        self.dir = Path(root)
        path = self.dir / DB_FILE
        if immutable:
            if not path.is_file():
                raise FileNotFoundError(f"no {DB_FILE} in the snapshot {self.dir}")
            uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._refuse_newer()
            self._check_schema(write=False)
            return
        if readonly:
            if not path.is_file():
                raise FileNotFoundError(
                    f"no index at {self.dir} ({DB_FILE} is missing); build one with: mmfusion index FOLDER --db {root}"
                )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)  # explicit transactions
        self.db.execute("PRAGMA busy_timeout = 30000")
        self._refuse_newer()  # before any write: an index of a newer schema is left exactly as it is
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            self.db.executescript(_SCHEMA)
            if self.meta("schema") is None:
                self.set_meta({"schema": SCHEMA_VERSION, "created": time.time()})
        self._check_schema(write=not readonly)

    def _refuse_newer(self) -> None:
        """Raise (closing the connection) when the index was written by a newer mmfusion; reads only."""
        version = self.meta("schema", SCHEMA_VERSION) if self._has_table("meta") else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            self.db.close()
            raise IndexSchemaError(
                f"{self.dir} was written by a newer mmfusion (index schema {version}; this one reads up to "
                f"{SCHEMA_VERSION}): upgrade mmfusion (pip install -U mmfusion), or index into another --db"
            )

    def _check_schema(self, write: bool) -> None:
        """Migrate an older schema (a writer), or let a reader of schema 1 see no segments."""
        version = self.meta("schema", SCHEMA_VERSION) if self._has_table("meta") else SCHEMA_VERSION
        self._has_segments = False
        if write:  # 1 -> 2 adds the segments table (files keep their rows and ids); a no-op when it is there
            with self.transaction():
                for statement in _SEGMENTS.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                # an older mmfusion writing a schema-2 index deletes files without their segments: drop those
                self.db.execute("DELETE FROM main.segments WHERE file_id NOT IN (SELECT id FROM main.files)")
            self._seed_segment_ids()
            if version < SCHEMA_VERSION:
                self.set_meta({"schema": SCHEMA_VERSION})
        # a reader of schema 1 reads an empty TEMP table under another name, so that it never shadows the real one a
        # writer may add later (then :attr:`seg` finds that one)
        self.db.execute(f"CREATE TEMP TABLE IF NOT EXISTS no_segments (id INTEGER PRIMARY KEY, {_SEGMENT_COLUMNS})")

    @property
    def seg(self) -> str:
        """The segments table to read: ``main.segments``, or an empty one while the index is of schema 1."""
        if not self._has_segments:
            self._has_segments = self._has_table("segments")
        return "main.segments" if self._has_segments else "temp.no_segments"

    def _has_table(self, name: str) -> bool:
        q = "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?"
        return self.db.execute(q, (name,)).fetchone() is not None

    def _seed_segment_ids(self) -> None:
        """Start the segments' AUTOINCREMENT at SEGMENT_ID_BASE (once), so no segment id is ever a file's."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'segments', ? "
                "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'segments')",
                (SEGMENT_ID_BASE - 1,),
            )

    def close(self) -> None:
        self.db.close()

    # ---- meta -------------------------------------------------------------------------------------

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, values: dict) -> None:
        with self.transaction():
            self.db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    # ---- transactions -----------------------------------------------------------------------------

    def transaction(self):
        return Transaction(self.db)

    # ---- files ------------------------------------------------------------------------------------

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    def ids(self) -> np.ndarray:
        """The ids the vector store should hold, in order: images' file ids, then video segments' ids."""
        sql = f"SELECT id FROM files WHERE {_NOT_VIDEO} UNION ALL SELECT id FROM {self.seg} ORDER BY 1"
        return np.fromiter((r[0] for r in self.db.execute(sql)), dtype=np.int64)

    def stats_by_path(self, root: str | None = None) -> dict[str, tuple[int, int, int, bytes]]:
        """path -> (id, size, mtime_ns, hash), for the files under ``root`` (or all)."""
        sql, args = "SELECT path, id, size, mtime_ns, hash FROM files", ()
        if root is not None:
            sql, args = sql + " WHERE root = ?", (root,)
        return {os.fsdecode(p): (i, s, m, h) for p, i, s, m, h in self.db.execute(sql, args)}

    def hashes(self) -> set[bytes]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT hash FROM files")}

    def vector_for_hash(self, digest: bytes) -> tuple[int, np.ndarray, str] | None:
        """(id, vector, path) of a file with this content, if any is indexed."""
        r = self.db.execute("SELECT id, vector, path FROM files WHERE hash = ? LIMIT 1", (digest,)).fetchone()
        return (r[0], np.frombuffer(r[1], dtype=np.float32).copy(), os.fsdecode(r[2])) if r else None

    def image_info_for_hash(self, digest: bytes) -> tuple[int, int, str, float | None]:
        """(width, height, format, taken) of a file with this content; zeros when none is indexed."""
        r = self.db.execute(
            "SELECT width, height, format, taken FROM files WHERE hash = ? LIMIT 1", (digest,)
        ).fetchone()
        return (r[0] or 0, r[1] or 0, r[2] or "", r[3]) if r else (0, 0, "", None)

    def video_for_hash(self, digest: bytes) -> tuple[int, np.ndarray, int, int, str] | None:
        """(id, vector, width, height, format) of a video with this content, if any is indexed."""
        r = self.db.execute(
            f"SELECT id, vector, width, height, format FROM files WHERE hash = ? AND NOT {_NOT_VIDEO} LIMIT 1",
            (digest,),
        ).fetchone()
        return (r[0], np.frombuffer(r[1], dtype=np.float32).copy(), r[2] or 0, r[3] or 0, r[4]) if r else None

    def get(self, ids: Iterable[int]) -> dict[int, FileRow]:
        out: dict[int, FileRow] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = f"SELECT {_ROW_COLS} FROM files WHERE id IN ({','.join('?' * len(chunk))})"
            out.update((r[0], _row(r)) for r in self.db.execute(q, chunk))
        return out

    def vectors(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, (N, D) vectors) for ``ids``: files' (a video's: the mean of its segments) or segments'."""
        found, vecs = [], []
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT id, vector FROM files WHERE id IN ({marks}) UNION ALL SELECT id, vector FROM {self.seg} " \
                f"WHERE id IN ({marks})"  # fmt: skip
            for i, v in self.db.execute(q, chunk + chunk):
                found.append(i)
                vecs.append(np.frombuffer(v, dtype=np.float32))
        dim = len(vecs[0]) if vecs else 0
        return np.asarray(found, dtype=np.int64), (np.stack(vecs) if vecs else np.zeros((0, dim), np.float32))

    def iter_vectors(self, batch: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, vectors) the vector store holds (images', then video segments'), in id order, a batch at a time."""
        for table, where in (("files", f"AND {_NOT_VIDEO}"), (self.seg, "")):
            last = -1
            while True:
                rows = self.db.execute(
                    f"SELECT id, vector FROM {table} WHERE id > ? {where} ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                yield (
                    np.asarray([r[0] for r in rows], dtype=np.int64),
                    np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]),
                )

    def insert(self, rows: list[dict]) -> list[int]:
        """Insert file rows (inside a transaction); returns their new ids."""
        ids = []
        for r in rows:
            cur = self.db.execute(
                "INSERT INTO files (path, display, root, size, mtime_ns, hash, width, height, format, taken, "
                "indexed_at, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    os.fsencode(r["path"]),
                    r["display"],
                    r["root"],
                    r["size"],
                    r["mtime_ns"],
                    r["hash"],
                    r.get("width"),
                    r.get("height"),
                    r.get("format"),
                    r.get("taken"),
                    r["indexed_at"],
                    np.ascontiguousarray(r["vector"], dtype=np.float32).tobytes(),
                ),
            )
            ids.append(int(cur.lastrowid))
        return ids

    def insert_segments(self, file_id: int, segments: list[dict]) -> list[int]:
        """Insert a video's segments (inside a transaction): dicts of start_s, end_s, thumb_s, vector; their new ids."""
        ids = []
        for seg in segments:
            cur = self.db.execute(
                "INSERT INTO main.segments (file_id, start_s, end_s, thumb_s, vector) VALUES (?, ?, ?, ?, ?)",
                (int(file_id), float(seg["start_s"]), float(seg["end_s"]), float(seg["thumb_s"]),
                 np.ascontiguousarray(seg["vector"], dtype=np.float32).tobytes()),
            )  # fmt: skip
            ids.append(int(cur.lastrowid))
        return ids

    def segments(
        self, ids: Iterable[int] | None = None, file_ids: Iterable[int] | None = None
    ) -> dict[int, SegmentRow]:
        """Segment rows by id: those of ``ids``, or all segments of the videos ``file_ids``."""
        key, values = ("id", ids) if ids is not None else ("file_id", file_ids)
        values = [int(i) for i in values or ()]
        out: dict[int, SegmentRow] = {}
        for start in range(0, len(values), 900):
            chunk = values[start : start + 900]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT id, file_id, start_s, end_s, thumb_s FROM {self.seg} WHERE {key} IN ({marks})"
            out.update((r[0], SegmentRow(*r)) for r in self.db.execute(q, chunk))
        return out

    def segment_vectors(self, file_id: int) -> list[dict]:
        """A video's segments with their vectors, in time order (a copy of the video reuses them)."""
        q = f"SELECT start_s, end_s, thumb_s, vector FROM {self.seg} WHERE file_id = ? ORDER BY start_s"
        return [{"start_s": a, "end_s": b, "thumb_s": t, "vector": np.frombuffer(v, dtype=np.float32).copy()}
                for a, b, t, v in self.db.execute(q, (int(file_id),))]  # fmt: skip

    def video_counts(self) -> dict[str, int]:
        """{"videos": video files, "segments": their segments}."""
        videos = self.db.execute(f"SELECT COUNT(*) FROM files WHERE NOT {_NOT_VIDEO}").fetchone()[0]
        return {
            "videos": int(videos),
            "segments": int(self.db.execute(f"SELECT COUNT(*) FROM {self.seg}").fetchone()[0]),
        }

    def vector_count(self, file_ids: Iterable[int]) -> int:
        """How many vectors the vector store holds for these files (an image's one, a video's segments)."""
        ids, n = [int(i) for i in file_ids], 0
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT (SELECT COUNT(*) FROM files WHERE id IN ({marks}) AND {_NOT_VIDEO}) + " \
                f"(SELECT COUNT(*) FROM {self.seg} WHERE file_id IN ({marks}))"  # fmt: skip
            n += int(self.db.execute(q, chunk + chunk).fetchone()[0])
        return n

    def has_segments(self) -> bool:
        return self.db.execute(f"SELECT 1 FROM {self.seg} LIMIT 1").fetchone() is not None

    def touch(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, file_id))

    def move(self, file_id: int, fields: dict) -> None:
        """A renamed file: row ``file_id`` keeps its id, content and vector, under a new path, root, size and mtime."""
        self.db.execute(
            "UPDATE files SET path = ?, display = ?, root = ?, size = ?, mtime_ns = ? WHERE id = ?",
            (os.fsencode(fields["path"]), fields["display"], fields["root"], fields["size"], fields["mtime_ns"],
             int(file_id)),
        )  # fmt: skip

    def delete(self, ids: Iterable[int]) -> list[int]:
        """Delete file rows (inside a transaction) and the segments of those that are videos; returns the segments'
        ids, which the vector store must drop too."""
        ids = [int(i) for i in ids]
        gone: list[int] = []
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            gone += [r[0] for r in self.db.execute(f"SELECT id FROM {self.seg} WHERE file_id IN ({marks})", chunk)]
            self.db.execute(f"DELETE FROM main.segments WHERE file_id IN ({marks})", chunk)
            self.db.execute(f"DELETE FROM files WHERE id IN ({marks})", chunk)
        return gone

    def filter_ids(self, path_glob: str | None = None, after: float | None = None, before: float | None = None):
        """Vector ids (images', and the segments' of videos) whose file's printable path matches ``path_glob`` and
        whose date (EXIF, else mtime) is in range."""
        where, args = [], []
        if path_glob:
            where.append("display GLOB ?")
            args.append(path_glob if any(c in path_glob for c in "*?[") else f"*{path_glob}*")
        date = "COALESCE(taken, mtime_ns / 1e9)"
        if after is not None:
            where.append(f"{date} >= ?")
            args.append(after)
        if before is not None:
            where.append(f"{date} < ?")
            args.append(before)
        cond = " AND ".join(where) or "1"
        sql = f"SELECT id FROM files WHERE {cond} AND {_NOT_VIDEO} UNION ALL SELECT s.id FROM {self.seg} s " \
              f"JOIN files ON files.id = s.file_id WHERE {cond}"  # fmt: skip
        return np.fromiter((r[0] for r in self.db.execute(sql, args + args)), dtype=np.int64)

    def roots(self) -> list[tuple[str, int]]:
        return [(r, n) for r, n in self.db.execute("SELECT root, COUNT(*) FROM files GROUP BY root ORDER BY root")]

    # ---- runs -------------------------------------------------------------------------------------

    def start_run(self) -> int:
        with self.transaction():
            return int(self.db.execute("INSERT INTO runs (started) VALUES (?)", (time.time(),)).lastrowid)

    def finish_run(self, run_id: int, report: dict) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE runs SET finished = ?, report = ? WHERE id = ?", (time.time(), json.dumps(report), run_id)
            )

    def last_run(self) -> dict | None:
        r = self.db.execute(
            "SELECT started, finished, report FROM runs WHERE finished IS NOT NULL ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return {"started": r[0], "finished": r[1], **json.loads(r[2] or "{}")} if r else None


class Transaction:
    """``with Transaction(db):`` BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


class WriteLock:
    """One writer per index directory: an exclusive ``flock`` held for the writer's lifetime.

    The lock belongs to the open file, so it is released when the process ends, however it ends.
    """

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise IndexLockedError(
                f"{self.path.parent} is being written by {holder}; one writer at a time: wait for it to "
                "finish (searching works meanwhile), or index into another --db"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
