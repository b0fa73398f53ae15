"""Video search: a video is one item of the index, searched by its time segments.

Frames are sampled every ``every_s`` seconds, plus the frame after each scene change (a cheap cut detector: the
mean absolute difference of consecutive 16x16 greyscale frames over ``cut_threshold``, as content-based shot
detection does). The index's image embedder embeds them, and consecutive samples are pooled into segments: a
sample joins the current segment while its cosine to the segment's mean stays at least ``similarity`` and no cut
lies between them. A segment's vector is the normalised mean of its frames' vectors; it keeps its start and end
(seconds) and the time of its most representative frame (the one nearest the mean), which is its thumbnail.

SQLite holds the video as a row of ``files`` (format: its MIME type; vector: the mean of its segments) and its
segments in ``segments`` (:mod:`.store`); the vector store holds one vector per segment. Indexing is incremental
as for images: an unchanged file costs a ``stat``, a renamed or copied one reuses its segments, a file that
cannot be read is skipped and reported. PyAV (``pip install 'mmfusion[video]'``) is imported only here, and only
when a video is met.

Searching (:func:`rank_hits`): a video appears once, at the rank of its best segment, with that segment's time
range; its other segments that would have made the top ``k`` on their own (ranked among the first ``k`` hits) are
listed with it (``segments``, best first, the best included), as a player's "key moments".
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.images import ImageDecodeError, resize_center_crop
from .decode import Decoded
from .encoder import QueryEncoder
from .query import SearchResult
from .scan import FileEntry
from .store import FileRow, SegmentRow, Store
from .writer import ChunkWriter, IndexReport

VIDEO_MIME = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
              ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}  # fmt: skip
VIDEO_EXTENSIONS = tuple(VIDEO_MIME)
NO_PYAV = "cannot index videos without PyAV (pip install 'mmfusion[video]')"
NON_FINITE = "the model produced a non-finite vector"


class VideoFileError(ImageDecodeError):
    """A video that cannot be read (damaged, no video stream, no frames, too long); the message says why."""


class VideoTooLargeError(VideoFileError):
    """A video whose frames have more pixels than the caller allows (checked before any frame is decoded)."""


class NoPyAVError(VideoFileError):
    """PyAV is not installed, so no video can be read here (the message names the extra to install)."""


@dataclass
class VideoOptions:
    """How videos are sampled and cut into segments."""

    every_s: float = 1.0  # a frame every this many seconds
    cut_threshold: float = 0.03  # a scene change: mean |difference| of 16x16 grey frames over this (fraction of 255)
    similarity: float = 0.9  # a sample joins the current segment while its cosine to the segment's mean is >= this
    max_samples: int = 20_000  # refuse a video needing more sampled frames than this (5.5 hours at 1 s)


def is_video_path(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def parse_every(text: str | float) -> float:
    """Seconds from ``1s``, ``0.5``, ``500ms`` or ``2s``.

    Raises:
        ValueError: not a positive duration.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*", str(text))
    value = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1) if m else 0.0
    if not value > 0:
        raise ValueError(f"--video-every {text!r}: give a positive duration such as 1s, 0.5s or 500ms")
    return value


def format_range(start: float, end: float) -> str:
    """``00:04-00:06``: to the nearest second (hours shown when needed)."""

    def clock(t: float) -> str:
        s = int(round(t))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"

    return f"{clock(start)}-{clock(end)}"


def pyav_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _pyav():
    try:
        import av
    except ImportError as e:
        raise NoPyAVError(NO_PYAV) from e
    return av


# ---- reading -----------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What :func:`iter_samples` learns of a video while decoding it (filled in once it is done)."""

    duration: float = 0.0  # seconds
    width: int = 0
    height: int = 0


def iter_samples(
    path: str, opts: VideoOptions, size: int | None, crop: bool = True, info: VideoInfo | None = None
) -> Iterator[tuple[float, object, bool]]:
    """Decode ``path`` once, yielding a frame every ``opts.every_s`` seconds and the first frame of each scene, one
    at a time (the caller embeds them in batches and keeps only vectors, so a long video never sits in memory).

    Args:
        size: the model's input side: frames are shrunk by the decoder so their short side is ``size`` (then
            centre-cropped to it when ``crop``); None: whole frames.
        info: filled with the video's duration and size once the last frame is decoded.

    Yields:
        (seconds, pixels, cut): pixels an (S, S, 3) uint8 array when ``size and crop``, else an RGB image; cut
        whether a scene change lies between the previous sample and this one.

    Raises:
        VideoFileError: unreadable, no video stream, no frames, or too long.
    """
    av = _pyav()
    info = info if info is not None else VideoInfo()
    min_gap = opts.every_s / 4  # a cut adds its first frame unless a cut's frame was taken this recently
    n = 0
    try:
        with av.open(path) as container:
            stream = _video_stream(container)
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or 25)
            next_t, last_cut, prev, cut_pending, t = 0.0, -math.inf, None, False, 0.0
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / fps
                small = frame.reformat(width=16, height=16, format="gray").to_ndarray().astype(np.float32)
                cut = prev is not None and float(np.abs(small - prev).mean()) > opts.cut_threshold * 255
                prev, cut_pending = small, cut_pending or cut
                at_cut = cut and t - last_cut >= min_gap
                if t >= next_t - 1e-6 or at_cut:
                    if n >= opts.max_samples:
                        raise VideoFileError(f"over {opts.max_samples} sampled frames: too long to index")
                    yield t, _frame_pixels(frame, size, crop), cut_pending and n > 0
                    n += 1
                    cut_pending, last_cut = False, t if at_cut else last_cut
                    next_t = (math.floor(t / opts.every_s + 1e-6) + 1) * opts.every_s
            info.width, info.height = stream.codec_context.width, stream.codec_context.height
            info.duration = t + 1.0 / fps
    except VideoFileError:
        raise
    except Exception as e:  # FFmpeg's errors (InvalidDataError, ...) and decoders' odd failures
        raise VideoFileError(f"cannot decode the video: {type(e).__name__}: {e}") from e
    if not n:
        raise VideoFileError("no frames could be decoded")


def _video_stream(container):
    if not container.streams.video:
        raise VideoFileError("no video stream: the file holds no video to show or index")
    return container.streams.video[0]


def _frame_pixels(frame, size: int | None, crop: bool):
    """The frame for the model: shrunk while decoding to a short side of ``size`` (as a JPEG is drafted for it), then
    centre-cropped when ``crop``; the whole RGB frame when ``size`` is None."""
    w, h = frame.width, frame.height
    if size and min(w, h) > size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        img = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_image()
    else:
        img = frame.to_image()  # RGB
    return np.asarray(resize_center_crop(img, size), dtype=np.uint8) if size and crop else img


def frame_at(path: str, t: float, max_pixels: int | None = None) -> Image.Image:
    """The RGB frame shown at ``t`` seconds (the last one before it when ``t`` is past the end).

    Args:
        max_pixels: refuse a video whose frames have more pixels than this, from the codec's size, before decoding.

    Raises:
        VideoFileError: unreadable, no video stream, or no frame decoded; :class:`VideoTooLargeError` for frames over
            ``max_pixels``; :class:`NoPyAVError` without PyAV.
    """
    av = _pyav()
    found = None
    try:
        with av.open(path) as container:
            stream = _video_stream(container)
            w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
            if max_pixels is not None and w * h > max_pixels:
                raise VideoTooLargeError(
                    f"its frames are {w}x{h} = {w * h:,} pixels, over this service's limit of {max_pixels:,} "
                    "(raise --max-pixels / MMFUSION_MAX_PIXELS to allow it)"
                )
            if stream.time_base and t > 0:
                container.seek(int(t / float(stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                if found is not None and frame.time is not None and frame.time > t + 1e-6:
                    break
                found = frame
            if found is None:
                raise VideoFileError("no frames could be decoded")
            return found.to_image()
    except VideoFileError:
        raise
    except Exception as e:
        raise VideoFileError(f"cannot decode the video: {type(e).__name__}: {e}") from e


def hash_file(path: str) -> bytes:
    """BLAKE2b-128 of the file's bytes, read in blocks (the same digest images get from :mod:`.decode`)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise VideoFileError(f"cannot read: {e.strerror or e}") from e
    return h.digest()


# ---- segments ----------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def pool_segments(
    times: list[float], vecs: np.ndarray, cuts: list[bool], duration: float, similarity: float
) -> list[dict]:
    """Consecutive samples pooled into segments (see the module's docstring).

    Args:
        times: (N,) sample times, increasing.
        vecs: (N, D) their normalised vectors.
        cuts: (N,) whether a scene change lies just before each sample.
        duration: the video's length (the last segment's end).

    Returns:
        Segments in time order: dicts of start_s, end_s, thumb_s and vector (normalised mean).
    """
    groups: list[list[int]] = [[0]]
    total = vecs[0].astype(np.float64)  # running sum of the current segment's vectors: linear, not quadratic
    for i in range(1, len(times)):
        if cuts[i] or float(vecs[i] @ _unit(total)) < similarity:  # the mean's direction is the sum's
            groups.append([i])
            total = vecs[i].astype(np.float64)
        else:
            groups[-1].append(i)
            total = total + vecs[i]
    out = []
    for n, g in enumerate(groups):
        mean = _unit(vecs[g].mean(0))
        best = g[int(np.argmax(vecs[g] @ mean))]
        start = 0.0 if n == 0 else times[g[0]]
        end = times[groups[n + 1][0]] if n + 1 < len(groups) else max(duration, times[g[-1]])
        out.append({"start_s": start, "end_s": end, "thumb_s": times[best], "vector": mean})
    return out


# ---- indexing ----------------------------------------------------------------------------------------------


class VideoIndexer:
    """Indexes the video files of a run, after the images, through the same writer.

    Args:
        gone: path -> row of files no longer there (a video found under a new path with a gone file's content is
            a rename: that row moves, keeping its id and segments); renamed ones are popped from it.
    """

    def __init__(
        self,
        store: Store,
        encoder: QueryEncoder,
        writer: ChunkWriter,
        report: IndexReport,
        gone: dict[str, tuple],
        opts: VideoOptions,
        batch_size: int = 64,
        progress: bool = True,
    ):
        self.store, self.encoder, self.writer, self.report, self.gone = store, encoder, writer, report, gone
        self.opts, self.batch_size, self.progress = opts, batch_size, progress
        self.gone_by_hash: dict[bytes, list[str]] = {}
        for path in sorted(gone, reverse=True):
            self.gone_by_hash.setdefault(gone[path][3], []).append(path)
        self.embedded_now: dict[bytes, tuple[np.ndarray, list[dict], Decoded]] = {}

    def run(self, todo: list[tuple[FileEntry, tuple | None]]) -> None:
        """Index the videos of ``todo`` (file, its row when the index holds an older version), in order."""
        if not todo:
            return
        if not pyav_available():
            self.report.skipped.extend((f.path, NO_PYAV) for f, _ in todo)
            return
        from tqdm.auto import tqdm

        for f, row in tqdm(todo, desc="videos", unit="video", disable=not self.progress):
            try:
                self._one(f, row)
            except VideoFileError as e:
                self.report.skipped.append((f.path, f"video: {e}"))
            self.writer.maybe_commit()

    def _one(self, f: FileEntry, row: tuple | None) -> None:
        digest = hash_file(f.path)
        if row is not None and row[3] == digest:
            self.writer.touch(row[0], f.size, f.mtime_ns)
            return
        if row is None and self.gone_by_hash.get(digest):  # a rename: the gone file's row (and segments) move here
            self.writer.move(self.gone.pop(self.gone_by_hash[digest].pop())[0], f)
            return
        known = self.embedded_now.get(digest) or self._indexed(digest)
        if known is not None:  # a copy of a video already indexed: its segments, no model call
            vector, segments, meta = known
            self.writer.add(f, meta, vector, replaces=row, kind="updated" if row else "duplicates", segments=segments)
            return
        vector, segments, meta = self._embed(f.path, digest)
        self.embedded_now[digest] = (vector, segments, meta)
        self.writer.add(f, meta, vector, replaces=row, kind="updated" if row else "added", segments=segments)

    def _indexed(self, digest: bytes) -> tuple[np.ndarray, list[dict], Decoded] | None:
        hit = self.store.video_for_hash(digest)
        if hit is None:
            return None
        file_id, vector, width, height, mime = hit
        return vector, self.store.segment_vectors(file_id), Decoded(digest, None, width, height, mime)

    def _embed(self, path: str, digest: bytes) -> tuple[np.ndarray, list[dict], Decoded]:
        """Embed a video's samples a batch at a time as they are decoded: only their times and vectors are kept."""
        enc, info = self.encoder, VideoInfo()
        times, cuts, vecs, batch = [], [], [], []
        for t, pixels, cut in iter_samples(path, self.opts, enc.size, enc.crop, info):
            times.append(t)
            cuts.append(cut)
            batch.append(pixels)
            if len(batch) == self.batch_size:
                vecs.append(enc.encode_pixels(batch, enc.transform))
                batch = []
        if batch:
            vecs.append(enc.encode_pixels(batch, enc.transform))
        z = np.concatenate(vecs).astype(np.float32)  # (N, D)
        self.report.model_calls += len(z)
        if not np.isfinite(z).all():
            raise VideoFileError(NON_FINITE)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        segments = pool_segments(times, z, cuts, info.duration, self.opts.similarity)
        vector = _unit(np.mean([seg["vector"] for seg in segments], axis=0))
        mime = VIDEO_MIME[os.path.splitext(path)[1].lower()]
        return vector, segments, Decoded(digest, None, info.width, info.height, mime)


# ---- searching ---------------------------------------------------------------------------------------------


def _segment_info(seg: SegmentRow, score: float) -> dict:
    return {"start": round(seg.start_s, 3), "end": round(seg.end_s, 3), "thumb": round(seg.thumb_s, 3),
            "score": round(float(score), 6)}  # fmt: skip


def rank_hits(
    scores: np.ndarray,
    ids: np.ndarray,
    rows: dict[int, FileRow],
    segments: dict[int, SegmentRow],
    k: int,
    threshold: float | None,
) -> list[SearchResult]:
    """Up to ``k`` results from a vector search's hits (best first): images as they are, a video once, at its
    best segment (``start``, ``end``, ``thumb`` in the metadata), listing in ``segments`` (best first, that one
    included) each of its segments ranked among the first ``k`` hits."""
    out: list[SearchResult] = []
    videos: dict[int, SearchResult] = {}
    for rank, (s, j) in enumerate(zip(scores, ids)):
        j = int(j)
        if j < 0 or (threshold is not None and s < threshold):
            continue
        seg = segments.get(j)
        file_id = seg.file_id if seg is not None else j
        if file_id not in rows:
            continue
        if seg is not None and file_id in videos:
            if rank < k:
                videos[file_id].metadata["segments"].append(_segment_info(seg, s))
            continue
        if len(out) >= k:
            break
        result = SearchResult.from_row(rows[file_id], float(s))
        if seg is not None:
            info = _segment_info(seg, s)
            result.metadata.update(start=info["start"], end=info["end"], thumb=info["thumb"], segments=[info])
            videos[file_id] = result
        out.append(result)
    return out
