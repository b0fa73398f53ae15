"""Write ShapesWorld to disk in the formats users bring (``images/`` + ``captions.jsonl``, class folders,
``qa.jsonl``), so every loader, trainer and evaluator can be run on files as well as on the stream.

Layout::

    OUT/world.json                         the ShapesConfig and the class lists
    OUT/<split>/images/000000.png          one folder per split (train, val, test, heldout)
    OUT/<split>/captions.jsonl             {"image", "caption", "meaning"}
    OUT/<split>/scenes.jsonl               {"image", "objects", ...}: the structured attributes
    OUT/<split>/qa.jsonl                   {"image", "question", "answer", "type"}
    OUT/<split>/sounds/000000.wav          with ``sound=``: each scene's sound (16-bit PCM), and a
                                           "sound" key in every record of the three files above
    OUT/zeroshot/{seen,heldout}/<colour_shape>/*.png   single-object scenes by class

Each folder is written beside its final place and renamed into it when complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ..utils.io import atomic_replace_dir, atomic_write_json, fresh_dir
from .shapes import ShapesWorld
from .sound import SoundConfig


def export_split(
    world: ShapesWorld, out: Path, split: str, n: int, progress: bool = True, sound: SoundConfig | None = None
) -> Path:
    tmp = fresh_dir(out / f".{split}.tmp")
    (tmp / "images").mkdir()
    if sound is not None:
        from .audio import _soundfile

        sf = _soundfile()
        (tmp / "sounds").mkdir()
    with (
        open(tmp / "captions.jsonl", "w") as fc,
        open(tmp / "scenes.jsonl", "w") as fs,
        open(tmp / "qa.jsonl", "w") as fq,
    ):
        for i in tqdm(range(n), desc=f"ShapesWorld {split}", unit="scene", disable=not progress):
            s = world.sample(split, i)
            rel = f"images/{i:06d}.png"
            s.image.save(tmp / rel, compress_level=1)
            ref = {"image": rel}
            if sound is not None:
                ref["sound"] = f"sounds/{i:06d}.wav"
                sf.write(tmp / ref["sound"], world.sound(s.scene, sound), sound.sample_rate, subtype="PCM_16")
            for c in s.captions:
                fc.write(json.dumps({**ref, "caption": c.text, "meaning": c.meaning}) + "\n")
            fs.write(json.dumps({**ref, **s.scene.to_dict()}) + "\n")
            for q in s.questions:
                fq.write(json.dumps({**ref, "question": q.question, "answer": q.answer, "type": q.type}) + "\n")
    return atomic_replace_dir(tmp, out / split)


def export_zeroshot(world: ShapesWorld, out: Path, per_class: int, progress: bool = True) -> Path:
    tmp = fresh_dir(out / ".zeroshot.tmp")
    for which in ("seen", "heldout"):
        items = world.classification_set(which, per_class)
        for scene, label in tqdm(items, desc=f"zero-shot {which}", unit="img", disable=not progress):
            d = tmp / which / label.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            world.render(scene).save(d / f"{scene.index}.png", compress_level=1)
    return atomic_replace_dir(tmp, out / "zeroshot")


def export_shapes(
    world: ShapesWorld,
    out: str | Path,
    counts: dict[str, int],
    zeroshot_per_class: int = 20,
    progress: bool = True,
    sound: SoundConfig | None = None,
) -> Path:
    """Write the given number of scenes of each split, plus zero-shot class folders.

    Args:
        world: the ShapesWorld to export.
        out: destination folder (created; splits already there are replaced).
        counts: scenes per split, e.g. ``{"train": 20000, "test": 1000, "heldout": 1000}``.
        zeroshot_per_class: images per 'colour shape' class in ``zeroshot/``; 0 to skip.
        sound: also write each scene's sound to ``<split>/sounds/`` with this config; None (the default)
            writes none, and the files are exactly as without sound.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        if n > 0:
            export_split(world, out, split, n, progress, sound)
    if zeroshot_per_class > 0:
        export_zeroshot(world, out, zeroshot_per_class, progress)
    meta = {
        "format": "mmfusion.shapesworld/1",
        "config": asdict(world.cfg),
        "counts": counts,
        "classes": {"all": world.combos("all"), "seen": world.combos("seen"), "heldout": world.combos("heldout")},
    }
    if sound is not None:
        meta["sound"] = asdict(sound)
    atomic_write_json(out / "world.json", meta)
    return out
