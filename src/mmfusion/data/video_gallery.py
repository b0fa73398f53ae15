"""A gallery of ShapesWorld videos with known answers, for video search: the demo's video gallery and the benchmark.

Each video is several ShapesWorld clips (:mod:`.video`) played back to back, each clip a *scene* of its own
length, background and objects, so a video has several segments whose content is known: the ground truth
(``gallery.json``) gives every scene's start and end (seconds) and its objects' colours and shapes. Objects are
drawn upright, as ShapesWorld images draw them (a square turned 45 degrees would be a diamond), and the clips'
actions are moves, growing and shrinking (no rotation). With ``distinct_colours`` the movers of one video's
scenes all have different colours. A gallery is a pure function of its arguments.

Example:
    >>> export_video_gallery("runs/gallery", n_videos=12, seed=0)  # runs/gallery/videos/*.mp4 + gallery.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..utils.io import atomic_replace_dir, atomic_write_json, fresh_dir
from .shapes import COLOURS
from .video import Clip, ShapesVideo, ShapesVideoConfig, render_clip, write_video

GALLERY_FORMAT = "mmfusion.video-gallery/1"
GALLERY_ACTIONS = ("left", "right", "up", "down", "grow", "shrink")  # no rotation: shapes stay upright
GALLERY_STREAM = 21  # the gallery's own random stream (scene counts, lengths, colours)


@dataclass
class GalleryConfig:
    """How a video gallery is drawn (recorded in ``gallery.json``; the same config gives the same files)."""

    n_videos: int = 12  # videos in the gallery
    seed: int = 0  # the same seed always gives the same videos
    scenes: tuple[int, int] = (3, 5)  # scenes per video, inclusive range
    scene_s: tuple[float, float] = (1.5, 3.0)  # seconds per scene
    fps: float = 8.0  # frames per second
    size: int = 64  # frame side in pixels (even)
    max_distractors: int = 1  # still objects beside each scene's mover: 0..max_distractors
    distinct_colours: bool = True  # the movers of one video's scenes have different colours


def _upright(clip: Clip, colour: str | None) -> Clip:
    """The clip with every object upright (angle 0), its mover recoloured to ``colour`` when given."""
    start = replace(clip.start, angle=0.0, colour=colour or clip.start.colour)
    end = replace(clip.end, angle=0.0, colour=colour or clip.end.colour)
    return replace(clip, start=start, end=end, others=tuple(replace(o, angle=0.0) for o in clip.others))


def gallery_video(cfg: GalleryConfig, index: int) -> tuple[np.ndarray, list[dict]]:
    """(frames (T, S, S, 3) uint8, scenes) of video ``index``: each scene a dict of start, end (seconds), action and
    objects (``{"colour", "shape", "role": "mover" | "still"}``)."""
    rng = np.random.default_rng([cfg.seed, GALLERY_STREAM, index])
    shapes = ShapesVideo(ShapesVideoConfig(seed=cfg.seed, actions=GALLERY_ACTIONS, max_distractors=cfg.max_distractors))
    n_scenes = int(rng.integers(cfg.scenes[0], cfg.scenes[1] + 1))
    colours = list(rng.permutation(list(COLOURS))) if cfg.distinct_colours else [None] * n_scenes
    if n_scenes > len(colours):
        raise ValueError(f"{n_scenes} scenes with distinct colours, but ShapesWorld has {len(COLOURS)} colours")
    frames, scenes, t = [], [], 0
    for k in range(n_scenes):
        clip = _upright(shapes.clip("test", index * 16 + k), colours[k])
        n = max(2, round(float(rng.uniform(*cfg.scene_s)) * cfg.fps))
        frames.append(render_clip(clip, n, cfg.size, shapes.cfg.supersample))
        objects = [{"colour": clip.start.colour, "shape": clip.start.shape, "role": "mover"}]
        objects += [{"colour": o.colour, "shape": o.shape, "role": "still"} for o in clip.others]
        scenes.append({"start": t / cfg.fps, "end": (t + n) / cfg.fps, "action": clip.action, "objects": objects})
        t += n
    return np.concatenate(frames), scenes


def export_video_gallery(
    out_dir: str | Path, n_videos: int = 12, seed: int = 0, progress: bool = False, **options
) -> Path:
    """Write ``n_videos`` ShapesWorld multi-scene videos as ``out_dir/videos/video_NNN.mp4`` (H.264 via PyAV) and
    their ground truth as ``out_dir/gallery.json``; a gallery already there with the same config is kept as it is.

    Args:
        options: the other fields of :class:`GalleryConfig` (scenes, scene_s, fps, size, max_distractors, ...).

    Returns:
        ``out_dir``. The ground truth: ``{"format", "config", "videos": [{"file", "duration", "scenes": [...]}]}``.
    """
    cfg = GalleryConfig(n_videos=n_videos, seed=seed, **options)
    out = Path(out_dir)
    meta_path = out / "gallery.json"
    wanted = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the file holds them
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("config") == wanted:
        return out
    tmp = fresh_dir(out.parent / f".{out.name}.tmp")
    (tmp / "videos").mkdir()
    videos = []
    for i in tqdm(range(cfg.n_videos), desc="video gallery", unit="video", disable=not progress):
        frames, scenes = gallery_video(cfg, i)
        rel = f"videos/video_{i:03d}.mp4"
        write_video(tmp / rel, frames, cfg.fps)
        videos.append({"file": rel, "duration": len(frames) / cfg.fps, "scenes": scenes})
    atomic_write_json(tmp / "gallery.json", {"format": GALLERY_FORMAT, "config": wanted, "videos": videos})
    atomic_replace_dir(tmp, out)
    return out


def read_gallery(out_dir: str | Path) -> dict:
    """The ground truth of a gallery written by :func:`export_video_gallery`."""
    path = Path(out_dir) / "gallery.json"
    if not path.is_file():
        raise FileNotFoundError(f"no gallery.json in {out_dir}: write one with export_video_gallery({str(out_dir)!r})")
    return json.loads(path.read_text())
