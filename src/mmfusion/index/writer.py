"""Indexing runs: what a run did (:class:`IndexReport`), and how its changes reach SQLite and FAISS.

:class:`ChunkWriter` buffers the rows a run adds, replaces and deletes, commits them in one SQLite
transaction per chunk, and only then applies them to the in-memory FAISS structure, which it saves
now and then. A crash between the two leaves FAISS behind SQLite, which opening the index repairs.

A run's counts are what it committed: each change is counted when its chunk commits, and Ctrl-C (or a
SIGTERM a caller turned into one) waits for a chunk being committed, so an interrupted run reports exactly
what it kept (:class:`IndexInterrupted`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .decode import Decoded
from .scan import display_path
from .store import Store
from .vectors import VectorStore


@dataclass
class IndexReport:
    """What one indexing run did."""

    added: int = 0  # new files, embedded
    updated: int = 0  # files whose content changed, re-embedded (or matched to a known vector)
    renamed: int = 0  # new paths whose content was indexed under a path now gone: that row moved (same id, vector)
    duplicates: int = 0  # new paths whose content is indexed under another path: vector reused
    touched: int = 0  # mtime changed, content did not
    unchanged: int = 0
    removed: int = 0  # rows of files gone from a scanned root (and not renamed)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    missing_roots: list[str] = field(default_factory=list)
    model_calls: int = 0  # images the model embedded
    elapsed_s: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM: the counts are what it committed; re-running resumes

    def summary(self) -> list[str]:
        if self.interrupted:
            lines = [
                f"interrupted after {self.elapsed_s:.1f}s; committed {self.added} added, {self.updated} updated, "
                f"{self.renamed} renamed, {self.duplicates} duplicates, {self.touched} touched, "
                f"{len(self.skipped)} skipped ({self.model_calls} images embedded)",
                "  re-run the same command to resume: what was committed is kept and not embedded again "
                "(deleted files are removed by a run that finishes)",
            ]
        else:
            lines = [
                f"indexed in {self.elapsed_s:.1f}s: {self.added} added, {self.updated} updated, "
                f"{self.renamed} renamed, {self.duplicates} duplicates, {self.removed} removed, "
                f"{self.unchanged + self.touched} unchanged, {len(self.skipped)} skipped "
                f"({self.model_calls} images embedded)"
            ]
        for root in self.missing_roots:
            lines.append(f"  {display_path(root)}: missing or holds no images, so nothing under it was removed")
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            key = why.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        for why, n in sorted(reasons.items(), key=lambda t: -t[1]):
            lines.append(f"  skipped {n}: {why}")
        for path, why in self.skipped[:10]:
            lines.append(f"    {display_path(path)}: {why}")
        if len(self.skipped) > 10:
            lines.append(f"    ... {len(self.skipped) - 10} more in the run's report")
        return lines


class IndexInterrupted(KeyboardInterrupt):
    """An indexing run stopped by Ctrl-C (or SIGTERM turned into it); ``report`` says what it committed.

    A KeyboardInterrupt, so code that stops on Ctrl-C still does; the index is consistent and the run is
    recorded as interrupted.
    """

    def __init__(self, report: IndexReport, why: str = ""):
        super().__init__(why)
        self.report = report


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (where Python handles them) until the block ends, then deliver them.

    A commit and the FAISS update that follows it then happen entirely or not at all, as far as an interruption
    is concerned; a signal whose handler is the default action (SIGTERM, by default) is left alone: it ends the
    process, which the SQLite transactions already survive. Off the main thread there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            saved[sig] = handler
            signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in caught:  # the handler, now restored, raises (KeyboardInterrupt) as it would have
            saved[sig](sig, None)


@dataclass
class CheckReport:
    ok: bool
    problems: list[str]
    repaired: list[str]


class ChunkWriter:
    """Buffers row changes and commits them in SQLite transactions, then applies them to FAISS.

    Each change carries what the report counts it as (added, updated, renamed, duplicates, touched, removed);
    the counts reach ``report`` when the change is committed.

    Args:
        store: the SQLite side, the source of truth.
        vectors: the in-memory FAISS side, which follows each commit.
        report: the run's report (counts of committed changes).
        chunk_size: row changes per transaction.
        commit_every_s: also commit when this much time passed since the last commit.
        save_every_s: call ``save_vectors`` at most this often (and less often when saving is slow).
        save_vectors: saves ``vectors`` to disk (the index's FAISS file).
    """

    def __init__(
        self,
        store: Store,
        vectors: VectorStore,
        report: IndexReport,
        chunk_size: int,
        commit_every_s: float,
        save_every_s: float,
        save_vectors: Callable[[], None],
    ):
        self.store, self.vectors, self.report, self.save_vectors = store, vectors, report, save_vectors
        self.chunk_size, self.commit_every_s, self.save_every_s = chunk_size, commit_every_s, save_every_s
        # one list entry per change, appended whole, so an interruption never leaves half a change buffered
        self.rows: list[dict] = []  # new rows, each with the id it "replaces" (or None) and its "kind"
        self.deletes: list[tuple[list[int], str | None]] = []  # (ids, kind they count as, or None)
        self.touches: list[tuple[int, int, int]] = []
        self.moves: list[tuple[int, dict]] = []  # renamed files: (id, new path fields); id and vector kept
        self.pending_vectors: dict[bytes, tuple[np.ndarray, str, tuple]] = {}
        self.last_commit = self.last_save = time.monotonic()

    def add(self, f, d: Decoded, vector: np.ndarray, replaces=None, kind: str = "added", segments=None) -> None:
        """A new row for file ``f``; ``replaces``: the row (its id first) of the file's older content; ``segments``:
        a video's time segments (dicts of start_s, end_s, thumb_s, vector), searched instead of ``vector``."""
        row = _path_fields(f) | {
            "hash": d.digest,
            "width": d.width or None,
            "height": d.height or None,
            "format": d.format or None,
            "taken": d.taken,
            "indexed_at": time.time(),
            "vector": vector,
            "replaces": replaces[0] if replaces is not None else None,
            "kind": kind,
            "segments": segments,
        }
        self.rows.append(row)
        self.pending_vectors[d.digest] = (vector, f.path, (d.width, d.height, d.format, d.taken))

    def touch(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.touches.append((file_id, size, mtime_ns))

    def move(self, file_id: int, f) -> None:
        """Row ``file_id`` now describes file ``f`` (a rename): same id, same vector, the new path."""
        self.moves.append((int(file_id), _path_fields(f)))

    def delete(self, ids, count_as_removed: bool = False) -> None:
        self.deletes.append(([int(i) for i in ids], "removed" if count_as_removed else None))

    def vector_for_hash(self, digest: bytes):
        if digest in self.pending_vectors:
            vec, path, _ = self.pending_vectors[digest]
            return None, vec, path
        return self.store.vector_for_hash(digest)

    def size_of(self, digest: bytes) -> tuple:
        if digest in self.pending_vectors:
            return self.pending_vectors[digest][2]
        return self.store.image_info_for_hash(digest)

    def _pending(self) -> int:
        return len(self.rows) + sum(len(ids) for ids, _ in self.deletes) + len(self.touches) + len(self.moves)

    def maybe_commit(self) -> None:
        n = self._pending()
        if n >= self.chunk_size or (n and time.monotonic() - self.last_commit >= self.commit_every_s):
            self.flush()

    def flush(self) -> None:
        if self._pending():
            with signals_deferred():  # committed, applied to FAISS and counted, or none of it
                self._commit()
        if time.monotonic() - self.last_save >= self.save_every_s:
            t0 = time.monotonic()
            self.save_vectors()
            self.last_save = time.monotonic()
            # a big index takes seconds to save: spend at most a tenth of the run's time saving
            self.save_every_s = max(self.save_every_s, 10 * (self.last_save - t0))

    def _commit(self) -> None:
        store, vi, rows = self.store, self.vectors, self.rows
        replaced = [r["replaces"] for r in rows if r["replaces"] is not None]
        deletes = [i for ids, _ in self.deletes for i in ids] + replaced
        with store.transaction():
            segments_gone = store.delete(deletes)
            for t in self.touches:
                store.touch(*t)
            for file_id, fields in self.moves:
                store.move(file_id, fields)
            new_ids = store.insert(rows)
            searched = [(i, r["vector"]) for i, r in zip(new_ids, rows) if r["segments"] is None]  # images
            for i, r in zip(new_ids, rows):
                if r["segments"] is not None:  # a video: its segments are what is searched
                    seg_ids = store.insert_segments(i, r["segments"])
                    searched += [(j, seg["vector"]) for j, seg in zip(seg_ids, r["segments"])]
        # SQLite has it now; FAISS follows (and is repaired from SQLite if a crash comes first)
        vi.remove(deletes + segments_gone)
        if searched:
            vi.add([i for i, _ in searched], np.stack([v for _, v in searched]))
        report = self.report
        for r in rows:
            setattr(report, r["kind"], getattr(report, r["kind"]) + 1)
        report.touched += len(self.touches)
        report.renamed += len(self.moves)
        report.removed += sum(len(ids) for ids, kind in self.deletes if kind == "removed")
        self.rows, self.deletes, self.touches, self.moves = [], [], [], []
        self.pending_vectors.clear()
        self.last_commit = time.monotonic()


def _path_fields(f) -> dict:
    """The columns of a row that say where the file is (a rename changes only these)."""
    return {"path": f.path, "display": display_path(f.path), "root": f.root, "size": f.size, "mtime_ns": f.mtime_ns}
