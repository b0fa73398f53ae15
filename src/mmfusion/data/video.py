"""Video in ShapesWorld: short clips in which one object acts, and the PyAV reader and writer of video files.

A clip shows a ShapesWorld-style scene (shapes and colours on a grey background) in which one object, the
*mover*, does one of seven actions while the other objects stand still: it moves ``left``, ``right``,
``up`` or ``down``, ``grow``\\ s, ``shrink``\\ s or ``rotate``\\ s (clockwise or anticlockwise). The action can
only be told from the order of the frames:

- every action has a time-reversed twin drawn with the same probability: a left clip played backwards is
  a right clip, a growing one a shrinking one, and a rotation one the other way round (still ``rotate``).
  The two have the same frames, so a model that ignores frame order (mean of per-frame features) cannot
  tell left from right, up from down, or grow from shrink;
- start positions, sizes, speeds and orientations are random, every object (not only a rotating one) has
  a random orientation, and movers are never circles (whose rotation cannot be seen), so no single frame
  shows which action it belongs to.

A clip is a pure function of ``(seed, split, index)``, drawn from a random stream of its own (like
sounds), so clips change no image, caption, question or sound. The mover's state (centre, radius, angle)
is interpolated linearly in time from its start to its end, so a clip renders at any number of frames.

Files: :func:`write_video` encodes frames to MP4 (H.264) with PyAV, :func:`export_videos` writes splits as
``<split>/video/000000.mp4`` + ``<split>/labels.jsonl`` (``{"video": "video/000000.mp4", "action": "left",
...}``), and :func:`read_video` / :class:`VideoFolder` read them back (``pip install 'mmfusion[video]'``).

Frame sampling: from a video of ``n`` decoded frames, ``T`` frames are taken at the centres of ``T`` equal
segments, indices ``floor((k + 0.5) * n / T)`` for ``k = 0 .. T-1`` (as in TSN's test-time sampling). With
``n == T`` every frame is taken once; with ``n < T`` frames repeat; the first and last ``n / 2T`` of the
video are never the only thing sampled.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..config import field
from ..utils.io import atomic_replace_dir, atomic_write_json, fresh_dir
from .datasets import DataFormatError, read_jsonl
from .images import CLIP_MEAN, CLIP_STD, normalize_batch, resize_center_crop
from .shapes import COLOURS, SHAPES, ShapesConfig, ShapesWorld, polygon

log = logging.getLogger(__name__)

ACTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink", "rotate")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")  # the actions only frame order tells apart
REVERSED: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up",
                            "grow": "shrink", "shrink": "grow", "rotate": "rotate"}  # fmt: skip
VIDEO_STREAM = 5  # random stream of clips (ShapesWorld uses 0-3 for scenes, captions, questions, sets; 4 for sound)
MOVER_SHAPES = tuple(s for s in SHAPES if s != "circle")  # a circle's rotation cannot be seen
MARGIN = 0.02  # every object stays this far (fraction of the side) inside the frame
VIDEO_HINT = "reading and writing video files needs PyAV: pip install 'mmfusion[video]'"


@dataclass
class ShapesVideoConfig:
    """How ShapesWorld clips are generated."""

    seed: int = field(0, "seed of the clips: the same seed always gives the same clips")
    frames: int = field(8, "frames per clip")
    image_size: int = field(32, "side of the frames in pixels")
    actions: tuple[str, ...] = field(ACTIONS, "the actions drawn (each equally often), from " + ", ".join(ACTIONS))
    max_distractors: int = field(1, "still objects beside the mover: 0..max_distractors, equally often")
    radius: tuple[float, float] = field((0.1, 0.18), "radius range of movers and rotators (fraction of the side)")
    distance: tuple[float, float] = field((0.3, 0.45), "how far a moving object travels (fraction of the side)")
    growth: tuple[float, float] = field((1.6, 2.2), "end/start radius ratio of growing clips (shrinking: inverse)")
    turn: tuple[float, float] = field((60.0, 120.0), "degrees a rotating object turns")
    supersample: int = field(2, "render at this multiple of the size, then downsample (anti-aliasing)")


@dataclass(frozen=True)
class Sprite:
    """One object in one frame: centre (fractions of the side, y down), radius (fraction), angle (radians)."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    angle: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Clip:
    """A clip: the mover goes from ``start`` to ``end`` (linearly in time) while ``others`` stand still."""

    action: str
    start: Sprite
    end: Sprite
    others: tuple[Sprite, ...]
    background: int  # grey level, 0-255
    split: str = "train"
    index: int = 0

    def mover_at(self, s: float) -> Sprite:
        """The mover at time ``s`` in [0, 1] (0: first frame, 1: last)."""
        a, b = self.start, self.end
        lerp = lambda u, v: u + (v - u) * s
        return replace(a, x=lerp(a.x, b.x), y=lerp(a.y, b.y), radius=lerp(a.radius, b.radius),
                       angle=lerp(a.angle, b.angle))  # fmt: skip

    def reversed(self) -> Clip:
        """The same clip played backwards, labelled with the action it then shows."""
        return replace(self, action=REVERSED[self.action], start=self.end, end=self.start)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "start": self.start.to_dict(), "end": self.end.to_dict(),
                "others": [o.to_dict() for o in self.others], "background": self.background,
                "split": self.split, "index": self.index}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Sampling


def _mover_path(action: str, rng: np.random.Generator, cfg: ShapesVideoConfig) -> tuple[dict, dict]:
    """Start and end states (x, y, radius, angle) of the mover. Each action's twin (``REVERSED``) draws from
    the same distribution with start and end swapped, which is what makes their frame sets alike."""
    r = float(rng.uniform(*cfg.radius))
    angle = float(rng.uniform(0.0, 2 * math.pi))
    lo, hi = r + MARGIN, 1 - r - MARGIN
    if action in DIRECTIONS:
        d = min(float(rng.uniform(*cfg.distance)), hi - lo)
        a = float(rng.uniform(lo, hi - d))  # the lower end of the path along the axis of motion
        c = float(rng.uniform(lo, hi))  # the other coordinate
        forward = action in ("right", "down")  # x and y grow to the right and downwards
        s, e = (a, a + d) if forward else (a + d, a)
        if action in ("left", "right"):
            return {"x": s, "y": c, "radius": r, "angle": angle}, {"x": e, "y": c, "radius": r, "angle": angle}
        return {"x": c, "y": s, "radius": r, "angle": angle}, {"x": c, "y": e, "radius": r, "angle": angle}
    if action in ("grow", "shrink"):
        k = float(rng.uniform(*cfg.growth))
        small = float(rng.uniform(cfg.radius[0] / math.sqrt(k), cfg.radius[1] / math.sqrt(k)))
        big = small * k
        x, y = (float(v) for v in rng.uniform(big + MARGIN, 1 - big - MARGIN, size=2))
        s, e = (small, big) if action == "grow" else (big, small)
        return {"x": x, "y": y, "radius": s, "angle": angle}, {"x": x, "y": y, "radius": e, "angle": angle}
    if action == "rotate":
        turn = math.radians(float(rng.uniform(*cfg.turn))) * (1 if rng.random() < 0.5 else -1)
        x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
        return {"x": x, "y": y, "radius": r, "angle": angle}, {"x": x, "y": y, "radius": r, "angle": angle + turn}
    raise ValueError(f"unknown action {action!r}; ShapesWorld clips show {list(ACTIONS)}")


def _clear_of_path(x: float, y: float, r: float, start: Sprite, end: Sprite) -> bool:
    """Whether a still object at (x, y) of radius r keeps clear of everywhere the mover goes."""
    px, py, qx, qy = start.x, start.y, end.x, end.y
    seg = (qx - px) ** 2 + (qy - py) ** 2
    u = 0.0 if seg == 0 else min(1.0, max(0.0, ((x - px) * (qx - px) + (y - py) * (qy - py)) / seg))
    dist = math.hypot(x - (px + u * (qx - px)), y - (py + u * (qy - py)))
    return dist > r + max(start.radius, end.radius) + 0.03


def sample_clip(rng: np.random.Generator, cfg: ShapesVideoConfig, split: str = "train", index: int = 0) -> Clip:
    """Draw one clip: an action, a mover with its path, and still distractors placed clear of that path."""
    bad = [a for a in cfg.actions if a not in ACTIONS]
    if bad or not cfg.actions:
        raise ValueError(f"unknown or no actions {bad or list(cfg.actions)}; choose from {list(ACTIONS)}")
    action = cfg.actions[int(rng.integers(len(cfg.actions)))]
    colours = list(COLOURS)
    shape = MOVER_SHAPES[int(rng.integers(len(MOVER_SHAPES)))]
    colour = colours[int(rng.integers(len(colours)))]
    s, e = _mover_path(action, rng, cfg)
    start, end = Sprite(shape, colour, **s), Sprite(shape, colour, **e)
    others: list[Sprite] = []
    for _ in range(int(rng.integers(cfg.max_distractors + 1))):
        shape_o, colour_o = SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(len(colours)))]
        r = float(rng.uniform(0.06, 0.12))
        angle = float(rng.uniform(0.0, 2 * math.pi))
        for _ in range(50):  # the same number of draws whether or not a place is found
            x, y = rng.uniform(r + MARGIN, 1 - r - MARGIN, size=2)
            if _clear_of_path(x, y, r, start, end) and all(
                math.hypot(x - o.x, y - o.y) > r + o.radius + 0.03 for o in others
            ):
                others.append(Sprite(shape_o, colour_o, float(x), float(y), float(r), float(angle)))
                break
    return Clip(action, start, end, tuple(others), int(rng.integers(15, 75)), split, index)


# ---------------------------------------------------------------------------------------------------
# Rendering


def _draw(draw: ImageDraw.ImageDraw, o: Sprite, side: int) -> None:
    cx, cy, r = o.x * side, o.y * side, o.radius * side
    colour = COLOURS[o.colour]
    if o.shape == "circle":
        rr = r * 0.9  # as ShapesWorld draws circles: areas stay comparable with the polygons
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=colour)
        return
    pts = np.asarray(polygon(o.shape, cx, cy, r)) - (cx, cy)  # (P, 2) about the centre
    c, s = math.cos(o.angle), math.sin(o.angle)
    pts = pts @ np.array([[c, s], [-s, c]]) + (cx, cy)  # rotated by angle (clockwise on screen, y down)
    draw.polygon([tuple(p) for p in pts], fill=colour)


def render_frame(sprites: Sequence[Sprite], background: int, size: int, supersample: int = 2) -> np.ndarray:
    """(size, size, 3) uint8 frame of the sprites, drawn in order over a grey background."""
    big = size * supersample
    img = Image.new("RGB", (big, big), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in sprites:
        _draw(draw, o, big)
    if supersample > 1:
        img = img.reduce(supersample)
    return np.asarray(img, dtype=np.uint8)


def render_clip(clip: Clip, frames: int = 8, size: int = 32, supersample: int = 2) -> np.ndarray:
    """(frames, size, size, 3) uint8: the clip sampled at ``frames`` evenly spaced times from start to end."""
    times = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    return np.stack([render_frame([*clip.others, clip.mover_at(float(s))], clip.background, size, supersample)
                     for s in times])  # fmt: skip


class ShapesVideo:
    """Seeded ShapesWorld clips of one object acting, by split and index, streamed in memory.

    Example:
        >>> video = ShapesVideo()
        >>> frames, action = video.sample("train", 0)  # (8, 32, 32, 3) uint8, e.g. "left"
    """

    def __init__(self, cfg: ShapesVideoConfig | None = None):
        self.cfg = cfg or ShapesVideoConfig()
        self.world = ShapesWorld(ShapesConfig(seed=self.cfg.seed))  # for its per-scene random streams

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg.actions)

    def clip(self, split: str, index: int) -> Clip:
        return sample_clip(self.world.rng(split, index, VIDEO_STREAM), self.cfg, split, index)

    def render(self, clip: Clip, frames: int | None = None, size: int | None = None) -> np.ndarray:
        return render_clip(clip, frames or self.cfg.frames, size or self.cfg.image_size, self.cfg.supersample)

    def sample(self, split: str, index: int) -> tuple[np.ndarray, str]:
        """(frames (T, S, S, 3) uint8, action) of clip ``index`` of a split."""
        clip = self.clip(split, index)
        return self.render(clip), clip.action

    def batch(self, split: str, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(clips (B, T, S, S, 3) uint8, labels (B,) int64: indices into ``class_names``)."""
        lookup = {a: i for i, a in enumerate(self.cfg.actions)}
        pairs = [self.sample(split, int(i)) for i in indices]
        return np.stack([p[0] for p in pairs]), np.array([lookup[p[1]] for p in pairs], dtype=np.int64)

    def stream(self, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, str]]:
        i = start
        while stop is None or i < stop:
            yield self.sample(split, i)
            i += 1


# ---------------------------------------------------------------------------------------------------
# Files (PyAV)


class VideoDecodeError(ValueError):
    """A file that could not be read as video; the message names the file and says why."""


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError(f"{VIDEO_HINT} ({e})") from e
    return av


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0, crf: int = 15) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames as an MP4 (H.264, yuv420p, ``crf``: lower is closer to lossless).
    H and W must be even (4:2:0 chroma). Falls back to MPEG-4 Part 2 where FFmpeg has no H.264 encoder."""
    av = _av()
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video needs (T, H, W, 3) uint8 frames with even H and W, got {frames.shape}")
    from fractions import Fraction

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count = 1  # tiny frames: threads cost more than they save
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "fast"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))  # flush the encoder
    return Path(path)


def sample_indices(n: int, frames: int) -> np.ndarray:
    """Indices of ``frames`` frames spread uniformly over ``n``: the centres of equal segments (see above)."""
    if n <= 0 or frames <= 0:
        raise ValueError(f"cannot sample {frames} frames from a video of {n}")
    return np.minimum(((np.arange(frames) + 0.5) * n / frames).astype(np.int64), n - 1)


def _to_array(frame, size: int | None) -> np.ndarray:
    if size is None or frame.width == frame.height == size:
        return frame.to_ndarray(format="rgb24")
    return np.asarray(resize_center_crop(frame.to_image(), size), dtype=np.uint8)  # short side, centre crop


def read_video(path: str | Path, frames: int = 8, size: int | None = None, max_frames: int = 100_000) -> np.ndarray:
    """Decode a video file to ``frames`` RGB frames (frames, S, S, 3) uint8, sampled uniformly over it.

    Args:
        path: any file FFmpeg reads (MP4, WebM, AVI, MKV, ...).
        frames: how many frames to return (the rule is in the module docstring).
        size: resize the short side to this and crop the centre square; None keeps the frames as they are.
        max_frames: refuse videos with more frames than this (a guard against decoding hours of video).

    Raises:
        VideoDecodeError: unreadable, no video stream, no frames, or too long.
    """
    av = _av()
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            n = int(stream.frames or 0)  # from the container; 0 when it does not say
            if n > max_frames:
                raise VideoDecodeError(f"{path}: {n} frames is over the limit of {max_frames}")
            if n > 0:  # decode up to the last frame needed, keeping only those
                wanted = sample_indices(n, frames)
                needed, kept = set(wanted.tolist()), {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in needed:
                        kept[i] = _to_array(frame, size)
                    if i >= wanted[-1]:
                        break
                if len(kept) == len(needed):
                    return np.stack([kept[i] for i in wanted])
                container.seek(0)  # fewer frames than the header said: decode them all below
            every = []
            for frame in container.decode(stream):
                every.append(_to_array(frame, size))
                if len(every) > max_frames:
                    raise VideoDecodeError(f"{path}: more than {max_frames} frames")
    except VideoDecodeError:
        raise
    except FileNotFoundError as e:
        raise VideoDecodeError(f"{path}: file not found") from e
    except Exception as e:  # FFmpeg errors (InvalidDataError, ...), and decoders' odd failures
        raise VideoDecodeError(f"{path}: {type(e).__name__}: {e}") from e
    if not every:
        raise VideoDecodeError(f"{path}: no frames could be decoded")
    return np.stack([every[i] for i in sample_indices(len(every), frames)])


def normalize_video(
    clips: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, T, 3, H, W), scaled to [0, 1] and normalised per channel."""
    B, T = clips.shape[:2]
    x = normalize_batch(clips.reshape(B * T, *clips.shape[2:]), mean, std)  # (B*T, 3, H, W)
    return x.view(B, T, *x.shape[1:])


@dataclass
class VideoFolder:
    """Clips and labels of a folder with ``labels.jsonl`` (``{"video": "video/x.mp4", "action": ...}``),
    decoded into memory. Unreadable files are skipped and listed in ``skipped``, never fatal."""

    clips: np.ndarray  # (N, T, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64 into class_names
    class_names: list[str]
    files: list[str]
    skipped: list[tuple[str, str]]  # (file, why)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def load(
        cls,
        root: str | Path,
        frames: int = 8,
        size: int = 32,
        class_names: Sequence[str] | None = None,
        label_key: str = "action",
        progress: bool = True,
    ) -> VideoFolder:
        """Decode every clip of ``root/labels.jsonl``.

        Args:
            class_names: the classes in order (a model's); default: those of the folder's video.json (see
                :func:`video_classes`), else the labels found, sorted. A label outside given classes is an error.
        """
        root = Path(root)
        path = root / "labels.jsonl"
        if not path.is_file():
            raise DataFormatError(f"no labels.jsonl in {root}: a video folder has labels.jsonl and the files it names")
        records = []
        for lineno, obj in read_jsonl(path):
            video, label = obj.get("video"), obj.get(label_key)
            if not isinstance(video, str) or not isinstance(label, str):
                raise DataFormatError(f"{path}:{lineno}: needs strings 'video' and {label_key!r}, got {obj}")
            records.append((video, label))
        if class_names is None:
            class_names = video_classes(root) or sorted({label for _, label in records})
        names = list(class_names)
        lookup = {c: i for i, c in enumerate(names)}
        unknown = sorted({label for _, label in records} - set(lookup))
        if unknown:
            raise DataFormatError(f"{path}: labels {unknown[:5]} are not among the classes {names}")
        clips, labels, files, skipped = [], [], [], []
        for video, label in tqdm(records, desc=f"decoding {root.name}", unit="clip", disable=not progress):
            try:
                clips.append(read_video(root / video, frames, size))
            except VideoDecodeError as e:
                skipped.append((video, str(e)))
                continue
            labels.append(lookup[label])
            files.append(video)
        if skipped:
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            log.warning("%s: skipped %d unreadable video(s): %s%s", root, len(skipped),
                        "; ".join(f"{v} ({why})" for v, why in skipped[:10]), more)  # fmt: skip
        out = np.stack(clips) if clips else np.zeros((0, frames, size, size, 3), np.uint8)
        return cls(out, np.asarray(labels, dtype=np.int64), names, files, skipped)


def video_classes(root: str | Path) -> list[str] | None:
    """The actions listed by the video.json of an export, in their order: ``root/video.json`` (the export) or
    ``root/../video.json`` (one of its splits); None when there is none."""
    for meta in (Path(root) / "video.json", Path(root).parent / "video.json"):
        if meta.is_file():
            actions = json.loads(meta.read_text()).get("actions")
            if actions:
                return list(actions)
    return None


def export_videos(
    video: ShapesVideo,
    out: str | Path,
    counts: dict[str, int],
    frames: int | None = None,
    fps: float = 8.0,
    crf: int = 15,
    progress: bool = True,
) -> Path:
    """Write ``counts[split]`` clips of each split as ``out/<split>/video/NNNNNN.mp4`` + ``labels.jsonl``,
    and ``out/video.json`` (the config and the action list). Each split is written beside its final place
    and renamed into it when complete.

    Args:
        frames: frames per file (default: the config's); a loader samples what a model needs from them.
    """
    _av()  # fail before writing anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = frames or video.cfg.frames
    for split, n in counts.items():
        if n <= 0:
            continue
        tmp = fresh_dir(out / f".{split}.tmp")
        (tmp / "video").mkdir()
        with open(tmp / "labels.jsonl", "w") as f:
            for i in tqdm(range(n), desc=f"ShapesWorld video {split}", unit="clip", disable=not progress):
                clip = video.clip(split, i)
                rel = f"video/{i:06d}.mp4"
                write_video(tmp / rel, video.render(clip, frames), fps, crf)
                f.write(json.dumps({"video": rel, "action": clip.action, "frames": frames, "clip": clip.to_dict()}))
                f.write("\n")
        atomic_replace_dir(tmp, out / split)
    meta = {"format": "mmfusion.shapesworld-video/1", "config": asdict(video.cfg), "actions": video.class_names,
            "frames": frames, "fps": fps, "counts": counts}  # fmt: skip
    atomic_write_json(out / "video.json", meta)
    return out
