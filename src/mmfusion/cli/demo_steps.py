"""The steps of ``mmfusion demo``: the world, the three models, their reports and the index, each reused when an
earlier run left it complete in ``--out``.

The demo trains three models one after the other on ShapesWorld, each from the one before: clip-tiny (search and
zero-shot labels), a caption-tiny captioner whose image encoder starts as that CLIP's, and the same captioner
fine-tuned on questions (VQA by generation: it both captions and answers). A total budget is shared between them
(:data:`STAGES` gives each its share).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..train import RunConfig

STEPS = 7  # data, clip, caption, vqa, evaluation, index, serve


@dataclass(frozen=True)
class Stage:
    """One model the demo trains: its task and preset, its share of the budget, what it starts from, and the
    settings (over the task's defaults) that make it learn fast enough in minutes."""

    name: str  # the run's folder under --out, and the prefix of its options (--caption.train.lr=...)
    task: str
    preset: str
    share: float
    what: str
    start_from: str | None = None  # the stage whose model this one starts from
    settings: dict[str, Any] = field(default_factory=dict)


STAGES = (
    Stage("clip", "clip", "clip-tiny", 0.2, "CLIP (search, zero-shot labels)"),
    # from the CLIP's image encoder; a short curriculum: the default one (30,000 single-object scenes first)
    # would spend the whole budget on scenes with one object (attribute accuracy 0.42 -> 0.70 at 2.5 minutes)
    Stage(
        "caption", "caption", "caption-tiny", 0.4, "captioner", "clip", {"data": {"shapes": {"curriculum": 2000}}}
    ),  # fmt: skip
    # the captioner fine-tuned on questions, captions still mixed in: it captions and answers. Batches of 32 images
    # (4 questions each): in a few minutes more steps beat bigger ones (VQA accuracy 0.45 -> 0.63 at 2 minutes)
    Stage(
        "vqa",
        "vqa",
        "caption-tiny",
        0.4,
        "VQA model (answers by generation)",
        "caption",
        {"data": {"shapes": {"curriculum": 0}}, "train": {"batch_size": 32}},
    ),  # fmt: skip
)
STAGE_NAMES = tuple(s.name for s in STAGES)
INIT_KEY = {"clip": "from_clip", "caption": "from_captioner"}  # how a stage names the model it starts from


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo keeps each thing under ``--out``."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "shapesworld"

    def run_of(self, stage: str) -> Path:
        return self.out / stage

    @property
    def run(self) -> Path:  # the CLIP, which the index and search use
        return self.run_of("clip")

    @property
    def eval(self) -> Path:
        return self.run / "eval"

    @property
    def index(self) -> Path:
        return self.out / "index"

    @property
    def gallery(self) -> Path:
        return self.data / "test" / "images"

    @property
    def video_gallery(self) -> Path:  # videos/*.mp4 and gallery.json (each scene's time range and objects)
        return self.out / "video-gallery"

    @property
    def videos(self) -> Path:
        return self.video_gallery / "videos"


# ---- the world ------------------------------------------------------------------------------------------


def world_counts(gallery: int) -> tuple[dict[str, int], int]:
    """Scenes per split and zero-shot images per class: 1000 test scenes -> 500 held-out and 20 per class."""
    return {"test": gallery, "heldout": max(1, gallery // 2)}, max(1, min(20, gallery // 50))


def prepare_data(where: DemoLayout, gallery: int, progress: bool) -> None:
    """Export ShapesWorld unless the same export is there."""
    from ..data.export import export_shapes
    from ..data.shapes import ShapesWorld

    world = ShapesWorld()
    counts, per_class = world_counts(gallery)
    meta = where.data / "world.json"
    if meta.is_file():
        stored = json.loads(meta.read_text())
        if stored.get("counts") == counts and stored.get("config") == json.loads(json.dumps(asdict(world.cfg))):
            print(f"[1/{STEPS}] reusing ShapesWorld in {where.data} ({gallery} gallery images)")
            return
        meta.unlink()  # written last by an export: an export cut short below is never taken for a whole one
    print(f"[1/{STEPS}] generating ShapesWorld in {where.data}: {gallery} gallery (test) scenes, "
          f"{counts['heldout']} held-out, {per_class} zero-shot images per class", flush=True)  # fmt: skip
    export_shapes(world, where.data, counts, per_class, progress=progress)


def prepare_videos(where: DemoLayout, n_videos: int, progress: bool) -> bool:
    """Write the video gallery (ShapesWorld clips played back to back, several scenes a video) unless the same one
    is there; False when there is none to index (``--videos 0``, or no PyAV)."""
    if n_videos < 1:
        return False
    try:
        import av  # noqa: F401
    except ImportError:
        print("        no video gallery: PyAV is missing (pip install 'mmfusion[video]')")
        return False
    from ..data.video_gallery import export_video_gallery, read_gallery

    if (where.video_gallery / "gallery.json").is_file():
        kept = read_gallery(where.video_gallery)["config"]
        if kept.get("n_videos") == n_videos:
            print(f"        reusing the video gallery in {where.video_gallery} ({n_videos} videos)")
            return True
    print(f"        writing {n_videos} ShapesWorld videos (several scenes each) to {where.videos}", flush=True)
    export_video_gallery(where.video_gallery, n_videos=n_videos, progress=progress)
    return True


# ---- the models -----------------------------------------------------------------------------------------


def split_options(extra: list[str]) -> dict[str, list[str]]:
    """``mmfusion train`` options per stage: ``--caption.train.lr=1e-3`` (or ``--caption.train.lr 1e-3``) goes to
    the captioner, ``--vqa.X`` to the VQA model, anything else to the CLIP."""
    out: dict[str, list[str]] = {s.name: [] for s in STAGES}
    stage = "clip"  # where a value given as the next word goes: the stage of the flag before it
    for arg in extra:
        if not arg.startswith("--"):
            out[stage].append(arg)
            continue
        head, _, rest = arg[2:].partition(".")
        stage = head if head in out and rest else "clip"
        out[stage].append("--" + rest if stage != "clip" or head == "clip" else arg)
    return out


def budgets(total_s: float, stages: list[Stage]) -> dict[str, float]:
    """Seconds for each stage trained: the total shared by the stages' shares."""
    weight = sum(s.share for s in stages) or 1.0
    return {s.name: total_s * s.share / weight for s in stages}


def duration(seconds: float) -> str:
    """A budget as `mmfusion train --time` reads it: 144 -> "2m24s", 2.4 -> "2s" (at least one second)."""
    total = max(1, round(seconds))
    minutes, rest = divmod(total, 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def run_config(where: DemoLayout, stage: Stage, seconds: float, progress: bool, extra: list[str]) -> RunConfig:
    """The stage's training on the ShapesWorld stream for ``seconds``, with ``mmfusion train`` options in
    ``extra``; a training cut short keeps the options it was started with (the model it resumes has their shape)."""
    from ..config import deep_update, from_dict, with_overrides
    from ..train import RunConfig
    from ..train.checkpoint import latest_checkpoint, read_state

    run = where.run_of(stage.name)
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is not None:
        data = read_state(ckpt)["run"]
    else:
        data = deep_update({"task": stage.task, "preset": stage.preset}, stage.settings)
        if stage.start_from:
            data = deep_update(data, {"init": {INIT_KEY[stage.start_from]: str(where.run_of(stage.start_from))}})
    length = {"steps": None, "epochs": None, "time": duration(seconds)}
    data = deep_update(data, {"out": str(run), "train": {**length, "progress": progress}})
    cfg = from_dict(RunConfig, with_overrides(data, extra))  # --train.batch_size=64, --model.vision.layers=3, ...
    if stage.start_from is None:
        cfg.model_config()  # a bad model override fails now, not after the data is made
    return cfg


def trained(where: DemoLayout, stage: str) -> bool:
    return (where.run_of(stage) / "model" / "config.json").is_file()


def prepare_model(where: DemoLayout, stage: Stage, cfg: RunConfig, step: int) -> bool:
    """Train as ``cfg`` says, resume a training cut short, or reuse a finished model. True if it trained."""
    from ..train import train
    from ..train.checkpoint import latest_checkpoint

    run = where.run_of(stage.name)
    if trained(where, stage.name):
        print(f"[{step}/{STEPS}] reusing the trained {stage.what} in {run / 'model'} (remove {run} to train again)")
        return False
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        start = f", starting from {where.run_of(stage.start_from)}" if stage.start_from else ""
        print(f"[{step}/{STEPS}] training the {stage.what}: {cfg.preset} on the ShapesWorld stream for "
              f"{cfg.train.time}{start}", flush=True)  # fmt: skip
    else:
        print(f"[{step}/{STEPS}] resuming the {stage.what}'s training cut short at {ckpt.name} in {run}")
    try:
        result = train(cfg, resume=ckpt is not None)
    except KeyboardInterrupt:
        last = latest_checkpoint(run / "checkpoints")
        raise KeyboardInterrupt(
            f"training stopped{f' at {last.name}' if last else ''}; run the demo again (same --out) to continue"
        ) from None
    print(f"        trained {result.steps} steps in {result.elapsed_s:.0f}s: {run / 'model'}")
    return True


# ---- the reports ------------------------------------------------------------------------------------------


def _stored(path: Path, size_key: str | None, size: int | None) -> dict | None:
    """A stored report asked for the same size (a report of another gallery size is redone), else None."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if size_key is None:
        return report
    return report if report.get("demo_n", report.get(size_key)) == size else None


def evaluate(where: DemoLayout, gallery: int, fresh: set[str], stages: list[str]) -> None:
    """Each trained model on held-out data: retrieval and zero-shot for the CLIP, captions (BLEU, CIDEr, attribute
    accuracy) for the captioner, answers for the VQA model. Stored reports are shown again for a reused model."""
    from ..eval import captioning, vqa
    from ..eval.report import evaluate_retrieval, evaluate_zeroshot, summary_lines, write_report

    data, n_caption, n_questions = str(where.data), min(200, gallery), min(400, 4 * gallery)
    jobs = {  # per stage: (report file, size key, size, run the evaluation, summary)
        "clip": [
            ("retrieval", "n_images", gallery,
             lambda m, out: evaluate_retrieval(m, data, n=gallery, out=out, progress=False), summary_lines),
            ("zeroshot", None, None, lambda m, out: evaluate_zeroshot(m, data, out=out, progress=False),
             summary_lines),
        ],
        "caption": [("captioning", "n", n_caption,
                     lambda m, out: captioning.evaluate_captioner(m, data, n=n_caption, out=out),
                     captioning.summary_lines)],
        "vqa": [("vqa", "n", n_questions, lambda m, out: vqa.evaluate_answerer(m, data, n=n_questions, out=out),
                 vqa.summary_lines)],
    }  # fmt: skip
    print(f"[5/{STEPS}] the models' reports on held-out scenes", flush=True)
    for name in stages:
        out = where.run_of(name) / "eval"
        model = None
        for kind, size_key, size, run, summary in jobs[name]:
            path = out / f"{kind}.json"
            report = None
            if name not in fresh:
                report = _stored(path, size_key, size)
            if report is None:
                if model is None:
                    from ..backends import load

                    print(f"        evaluating {where.run_of(name)} ({kind})", flush=True)
                    model = load(where.run_of(name))
                report = run(model, out)
                if size is not None:
                    report["demo_n"] = size  # what was asked (a small export may hold fewer questions)
                write_report(report, path)
            print("\n".join(summary(report)))
        print(f"        reports: {out}; training curves: {where.run_of(name) / 'plots' / 'training.png'}")


# ---- the index ----------------------------------------------------------------------------------------------


def index_gallery(where: DemoLayout, progress: bool, videos: bool = False) -> None:
    """Bring the index up to date with the gallery (and the video gallery); unchanged files cost a ``stat``, no
    model call."""
    from ..index import Index, IndexMismatchError

    folders = [where.gallery, *([where.videos] if videos else [])]
    print(f"[6/{STEPS}] indexing {' and '.join(map(str, folders))} into {where.index}", flush=True)
    try:
        ix = Index.open(where.index, model=str(where.run), write=True)
    except IndexMismatchError as e:  # the CLIP was trained again since: rebuild the index if it is the demo's own
        if not _built_by(where.index, where.run):
            raise IndexMismatchError(f"{e}; {where.index} was not built by this demo: choose another --out") from None
        print(f"        the model changed since {where.index} was built: building it again")
        shutil.rmtree(where.index)
        ix = Index.open(where.index, model=str(where.run), write=True)
    with ix:
        report = ix.update(folders, progress=progress)
        items = ix.store.count()
    for line in report.summary():
        print(f"        {line}")
    print(f"        {items} {'images and videos' if videos else 'images'} in the index")


def _built_by(db: Path, run: Path) -> bool:
    """Whether the index at ``db`` records ``run`` as its model (the demo's own index, safe to rebuild)."""
    from ..index import Index
    from ..index.collection import model_ref

    with Index.open(db) as ix:
        stored = ix.store.meta("model") or {}
    return stored.get("ref") == model_ref(run)
