"""Indexing runs: what a run did (:class:`IndexReport`), and how its changes reach SQLite and FAISS.

:class:`ChunkWriter` buffers the rows a run adds, replaces and deletes, commits them in one SQLite
transaction per chunk, and only then applies them to the in-memory FAISS structure, which it saves
now and then. A crash between the two leaves FAISS behind SQLite, which opening the index repairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .ann import VectorIndex
from .decode import Decoded
from .scan import display_path
from .store import Store


@dataclass
class IndexReport:
    """What one indexing run did."""

    added: int = 0  # new files, embedded
    updated: int = 0  # files whose content changed, re-embedded (or matched to a known vector)
    renamed: int = 0  # new paths whose content was indexed under a path that is gone: vector reused
    duplicates: int = 0  # new paths whose content is indexed under another path: vector reused
    touched: int = 0  # mtime changed, content did not
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    missing_roots: list[str] = field(default_factory=list)
    model_calls: int = 0  # images the model embedded
    elapsed_s: float = 0.0

    def summary(self) -> list[str]:
        lines = [
            f"indexed in {self.elapsed_s:.1f}s: {self.added} added, {self.updated} updated, {self.renamed} renamed, "
            f"{self.duplicates} duplicates, {self.removed} removed, {self.unchanged + self.touched} unchanged, "
            f"{len(self.skipped)} skipped ({self.model_calls} images embedded)"
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


@dataclass
class CheckReport:
    ok: bool
    problems: list[str]
    repaired: list[str]


class ChunkWriter:
    """Buffers row changes and commits them in SQLite transactions, then applies them to FAISS.

    Args:
        store: the SQLite side, the source of truth.
        vectors: the in-memory FAISS side, which follows each commit.
        report: the run's report (removals are counted here).
        chunk_size: row changes per transaction.
        commit_every_s: also commit when this much time passed since the last commit.
        save_every_s: call ``save_vectors`` at most this often (and less often when saving is slow).
        save_vectors: saves ``vectors`` to disk (the index's FAISS file).
    """

    def __init__(
        self,
        store: Store,
        vectors: VectorIndex,
        report: IndexReport,
        chunk_size: int,
        commit_every_s: float,
        save_every_s: float,
        save_vectors: Callable[[], None],
    ):
        self.store, self.vectors, self.report, self.save_vectors = store, vectors, report, save_vectors
        self.chunk_size, self.commit_every_s, self.save_every_s = chunk_size, commit_every_s, save_every_s
        self.rows: list[dict] = []
        self.deletes: list[int] = []
        self.touches: list[tuple[int, int, int]] = []
        self.pending_vectors: dict[bytes, tuple[np.ndarray, str, tuple]] = {}
        self.last_commit = self.last_save = time.monotonic()

    def add(self, f, d: Decoded, vector: np.ndarray, replaces=None) -> None:
        if replaces is not None:
            self.deletes.append(replaces[0])
        self.rows.append(
            {
                "path": f.path,
                "display": display_path(f.path),
                "root": f.root,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
                "hash": d.digest,
                "width": d.width or None,
                "height": d.height or None,
                "format": d.format or None,
                "taken": d.taken,
                "indexed_at": time.time(),
                "vector": vector,
            }
        )
        self.pending_vectors[d.digest] = (vector, f.path, (d.width, d.height, d.format, d.taken))

    def touch(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.touches.append((file_id, size, mtime_ns))

    def delete(self, ids, count_as_removed: bool = False) -> None:
        self.deletes.extend(int(i) for i in ids)
        if count_as_removed:
            self.report.removed += len(ids)

    def vector_for_hash(self, digest: bytes):
        if digest in self.pending_vectors:
            vec, path, _ = self.pending_vectors[digest]
            return None, vec, path
        return self.store.vector_for_hash(digest)

    def size_of(self, digest: bytes) -> tuple:
        if digest in self.pending_vectors:
            return self.pending_vectors[digest][2]
        return self.store.image_info_for_hash(digest)

    def maybe_commit(self) -> None:
        n = len(self.rows) + len(self.deletes) + len(self.touches)
        if n >= self.chunk_size or (n and time.monotonic() - self.last_commit >= self.commit_every_s):
            self.flush()

    def flush(self) -> None:
        store, vi = self.store, self.vectors
        if self.rows or self.deletes or self.touches:
            with store.transaction():
                store.delete(self.deletes)
                for t in self.touches:
                    store.touch(*t)
                new_ids = store.insert(self.rows)
            # SQLite has it now; FAISS follows (and is repaired from SQLite if a crash comes first)
            vi.remove(self.deletes)
            if self.rows:
                vi.add(new_ids, np.stack([r["vector"] for r in self.rows]))
            self.rows, self.deletes, self.touches = [], [], []
            self.pending_vectors.clear()
            self.last_commit = time.monotonic()
        if time.monotonic() - self.last_save >= self.save_every_s:
            t0 = time.monotonic()
            self.save_vectors()
            self.last_save = time.monotonic()
            # a big index takes seconds to save: spend at most a tenth of the run's time saving
            self.save_every_s = max(self.save_every_s, 10 * (self.last_save - t0))
