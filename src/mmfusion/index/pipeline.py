"""An indexing run: scan the folders, decode what changed in threads, embed it in batches, write it in chunks.

Decoding overlaps the model's work: a window of files is always being decoded ahead of the batch being
embedded. Content the index already holds (a renamed, copied or touched file) is recognised by its hash
before it is decoded and reuses its vector, so re-running on a folder embeds only what is new.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from ..utils.io import atomic_write_json
from .decode import Decoded, DecodeGate, decode_file
from .encoder import QueryEncoder
from .scan import FileEntry, image_extensions, is_under, scan
from .store import Store
from .vectors import VectorStore
from .video import VIDEO_EXTENSIONS, VideoIndexer, VideoOptions, is_video_path
from .writer import ChunkWriter, IndexInterrupted, IndexReport

NON_FINITE = "the model produced a non-finite vector"


@dataclass
class UpdateOptions:
    """How an indexing run works (see :meth:`Index.update`, which documents each)."""

    batch_size: int = 64  # images per model call
    workers: int | None = None  # decoding threads; None: one per CPU, halved while the model is the bottleneck
    chunk_size: int = 256  # files per committed transaction
    commit_every_s: float = 10.0  # also commit when this much time passed since the last commit
    save_every_s: float = 60.0  # save the FAISS file at most this often during a run
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse images with more pixels than this (None: no limit)
    draft: bool = True  # decode JPEGs at reduced scale when the model needs few pixels
    progress: bool = True  # show a progress bar
    video: VideoOptions | None = field(default_factory=VideoOptions)  # how videos are indexed; None: not at all


def update_index(
    store: Store,
    vectors: VectorStore,
    encoder: QueryEncoder,
    roots: Sequence[str | os.PathLike],
    opts: UpdateOptions,
    save_vectors: Callable[[], None],
    reports_dir: Path,
    pipeline: Callable[..., EmbedPipeline] | None = None,
) -> IndexReport:
    """Bring ``store`` and ``vectors`` up to date with the image files under ``roots``; see :meth:`Index.update`.

    ``pipeline`` builds what decodes and embeds the files that changed (default :class:`EmbedPipeline`, in this
    process; :class:`~mmfusion.index.ray_embed.RayEmbedPipeline` on a Ray cluster).

    Raises:
        IndexInterrupted: Ctrl-C (or a SIGTERM the caller turned into a KeyboardInterrupt); what was committed is
            kept, and the run is recorded (and its report written) as interrupted.
    """
    t0 = time.perf_counter()
    report = IndexReport()
    run_id = store.start_run()
    writer = ChunkWriter(store, vectors, report, opts.chunk_size, opts.commit_every_s, opts.save_every_s, save_vectors)
    try:
        found = scan(list(roots), image_extensions() + (VIDEO_EXTENSIONS if opts.video else ()))
        report.skipped.extend(found.skipped)
        report.missing_roots.extend(found.missing_roots)
        known_rows = store.stats_by_path()  # path -> (id, size, mtime_ns, hash)
        seen = {f.path for f in found.files}
        todo = []
        for f in found.files:
            row = known_rows.get(f.path)
            if row is not None and row[1] == f.size and row[2] == f.mtime_ns:
                report.unchanged += 1
            else:
                todo.append((f, row))
        # a root that is missing or empty (an unmounted disk) is not in found.roots: nothing under it goes
        gone = {
            path: row
            for path, row in known_rows.items()
            if path not in seen and any(is_under(path, r) for r in found.roots)
        }
        images = [t for t in todo if not is_video_path(t[0].path)]
        (pipeline or EmbedPipeline)(store, encoder, writer, report, seen, opts, gone).run(images)
        if opts.video:  # then the videos, in this process, through the same writer
            videos = [t for t in todo if is_video_path(t[0].path)]
            VideoIndexer(store, encoder, writer, report, gone, opts.video, opts.batch_size, opts.progress).run(videos)
        writer.delete([row[0] for row in gone.values()], count_as_removed=True)  # those no rename took over
        writer.flush()
        if vectors.needs_rebuild():
            vectors.rebuild()
        save_vectors()
    except KeyboardInterrupt as e:
        report.interrupted = True
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: keep what is committed, and stop
            writer.flush()  # the changes made so far are whole: keep them
        record_run(store, run_id, report, reports_dir, time.perf_counter() - t0)
        save_vectors()
        raise IndexInterrupted(report, str(e)) from None
    record_run(store, run_id, report, reports_dir, time.perf_counter() - t0)
    return report


def record_run(store: Store, run_id: int, report: IndexReport, reports_dir: Path, elapsed_s: float) -> None:
    """Finish the run's row in the runs table and write its JSON report."""
    report.elapsed_s = elapsed_s
    data = asdict(report)
    store.finish_run(run_id, {k: v for k, v in data.items() if k != "skipped"} | {"skipped": len(report.skipped)})
    atomic_write_json(reports_dir / f"index-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}.json", data)


Todo = tuple[FileEntry, tuple | None]  # a file to index, and its row when the index holds an older version


class EmbedPipeline:
    """Decodes files in threads, embeds them in batches and hands the vectors to the writer.

    Content already indexed, or embedded earlier in this run, reuses its vector; a copy of content that waits
    in the current batch follows it (a "follower") and gets its vector when the batch is embedded. A new path
    whose content was indexed under a path that is gone (``gone``) is a rename: that row moves to the new path,
    keeping its id and vector, and is no longer gone.
    """

    def __init__(
        self,
        store: Store,
        encoder: QueryEncoder,
        writer: ChunkWriter,
        report: IndexReport,
        seen: set[str],
        opts: UpdateOptions,
        gone: dict[str, tuple] | None = None,
    ):
        self.encoder, self.writer, self.report, self.seen, self.opts = encoder, writer, report, seen, opts
        self.gone = gone if gone is not None else {}  # path -> row of the files no longer there; renames take theirs
        self.gone_by_hash: dict[bytes, list[str]] = {}
        for path in sorted(self.gone, reverse=True):  # popped from the end: the first path in order goes first
            self.gone_by_hash.setdefault(self.gone[path][3], []).append(path)
        self.known = store.hashes()
        self.embedded_now: dict[bytes, np.ndarray] = {}  # content embedded earlier in this run
        self.batch: list[tuple] = []
        self.followers: dict[bytes, list[tuple]] = {}  # copies of content waiting in the batch
        from ..utils.threads import configure_threads

        plan = configure_threads(workers=opts.workers)  # decoders and torch's threads share the cores, never more
        self.gate = DecodeGate(plan.workers)
        self.embed_s, self.embedded = 0.0, 0  # model time, images

    def run(self, todo: list[Todo]) -> None:
        """Index the files of ``todo``, in order."""
        from tqdm.auto import tqdm

        hide = not self.opts.progress or not todo
        bar = tqdm(total=len(todo), unit="file", desc="index", disable=hide, smoothing=0.1)
        pool = ThreadPoolExecutor(max_workers=self.gate.threads)
        try:
            for f, row, job in self._decodes(todo, pool):
                bar.update(1)
                try:
                    d: Decoded = job.result()
                except ImageDecodeError as e:
                    self.report.skipped.append((f.path, str(e)))
                    continue
                self._take(f, row, d)
            self._flush_batch()
        finally:  # hand back held permits first, so queued decodes can run or be cancelled
            self.gate.limit(self.gate.threads)
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _decodes(self, todo: list[Todo], pool: ThreadPoolExecutor) -> Iterator[tuple[FileEntry, tuple | None, Future]]:
        """(file, row, decode job) in order, with a window of decodes running ahead of the one handed out."""
        opts, enc = self.opts, self.encoder
        window: deque = deque()
        items = iter(todo)

        def submit_next() -> bool:
            nxt = next(items, None)
            if nxt is None:
                return False
            args = (nxt[0].path, enc.size, opts.max_pixels, opts.draft, self.known.__contains__, enc.crop)
            window.append((nxt, pool.submit(self.gate.run, decode_file, *args)))
            return True

        for _ in range(max(2 * opts.batch_size, 4 * self.gate.threads)):
            if not submit_next():
                break
        while window:
            (f, row), job = window.popleft()
            submit_next()
            yield f, row, job

    def _take(self, f: FileEntry, row: tuple | None, d: Decoded) -> None:
        """One decoded file: reuse a vector, follow a copy in the batch, or join the batch."""
        if (d.pixels is None or d.digest in self.embedded_now) and self._reuse(f, row, d):
            return
        if d.pixels is None:  # the content's only row went earlier in this run: embed it after all
            try:
                d = decode_file(
                    f.path, self.encoder.size, self.opts.max_pixels, self.opts.draft, crop=self.encoder.crop
                )
            except ImageDecodeError as e:
                self.report.skipped.append((f.path, str(e)))
                return
        if any(d.digest == b[2].digest for b in self.batch):
            self.followers.setdefault(d.digest, []).append((f, row, d))
            return
        self.batch.append((f, row, d))
        if len(self.batch) >= self.opts.batch_size:
            self._flush_batch()
        self.writer.maybe_commit()

    def _flush_batch(self) -> None:
        """Embed the batch, write its vectors, then those of its followers."""
        if not self.batch:
            return
        t0 = time.perf_counter()
        vecs = self.encoder.encode_pixels([d.pixels for _, _, d in self.batch], self.encoder.transform)
        self.embed_s += time.perf_counter() - t0
        self.embedded += len(self.batch)
        self.report.model_calls += len(self.batch)
        for (f, row, d), v in zip(self.batch, vecs):
            self._write_vector(f, row, d, v)
        self.batch.clear()
        for waiting in self.followers.values():
            for f, row, d in waiting:
                if not self._reuse(f, row, d):
                    self.report.skipped.append((f.path, NON_FINITE))
        self.followers.clear()
        self._adapt_threads()

    def _write_vector(self, f: FileEntry, row: tuple | None, d: Decoded, v: np.ndarray) -> None:
        """A file the model just embedded: its new row (or the old row replaced), unless the vector is not finite."""
        if not np.isfinite(v).all():
            self.report.skipped.append((f.path, NON_FINITE))
            return
        self.embedded_now[d.digest] = v
        self.writer.add(f, d, v, replaces=row, kind="updated" if row else "added")

    def _adapt_threads(self) -> None:
        """Half the threads when one core decodes faster than the model embeds, else all of them."""
        per_decode = self.gate.cpu_per_item()
        if self.opts.workers or per_decode is None or self.embedded < 2 * self.opts.batch_size:
            return
        model_bound = per_decode < self.embed_s / self.embedded
        self.gate.limit(max(1, self.gate.threads // 2) if model_bound else self.gate.threads)

    def _reuse(self, f: FileEntry, row: tuple | None, d: Decoded) -> bool:
        """A file whose content already has a vector: no model call. False when that vector is gone."""
        writer = self.writer
        if row is not None and row[3] == d.digest:
            writer.touch(row[0], f.size, f.mtime_ns)
            return True
        if row is None and self.gone_by_hash.get(d.digest):  # a rename: the gone file's row moves here
            old_path = self.gone_by_hash[d.digest].pop()
            writer.move(self.gone.pop(old_path)[0], f)
            return True
        hit = writer.vector_for_hash(d.digest)
        if hit is None and d.digest not in self.embedded_now:
            return False
        vec = hit[1] if hit is not None else self.embedded_now[d.digest]
        meta = Decoded(d.digest, None, *writer.size_of(d.digest))
        writer.add(f, meta, vec, replaces=row, kind="updated" if row is not None else "duplicates")
        return True
