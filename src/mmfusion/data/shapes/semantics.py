"""What a ShapesWorld caption means for a scene: whether it is true, why not, and whether it was written for it.

A meaning's object references are matched to distinct objects of the scene (every assignment is tried),
then its relations, regions and count are checked. :func:`why_false` names the first thing that fails,
so the top-1 errors of a model can be read as what it confuses.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ..scene import Obj, Scene


def _region_holds(o: Obj, region: str) -> bool:
    checks = {
        "left": o.x < 0.5,
        "right": o.x > 0.5,
        "top": o.y < 0.5,
        "bottom": o.y > 0.5,
        "middle": 0.3 < o.x < 0.7 and 0.3 < o.y < 0.7,
    }
    return all(checks[part] for part in region.split())


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    return {"left_of": a.x < b.x, "right_of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]


def assignments(scene: Scene, meaning: dict) -> Iterator[tuple[int, ...]]:
    """Every way the meaning holds in the scene: for each, the scene object each reference names, in order."""
    objs = scene.objects
    refs = meaning.get("objects", [])
    if meaning.get("count") is not None and meaning["count"] != len(objs):
        return
    if len(refs) > len(objs):
        return
    for assignment in itertools.permutations(range(len(objs)), len(refs)):
        ok = True
        for ref, k in zip(refs, assignment):
            o = objs[k]
            if any(ref.get(a) is not None and ref[a] != getattr(o, a) for a in ("shape", "colour", "size")):
                ok = False
                break
            if ref.get("region") and not _region_holds(o, ref["region"]):
                ok = False
                break
        if ok and all(
            relation_holds(objs[assignment[i]], rel, objs[assignment[j]]) for i, rel, j in meaning.get("relations", [])
        ):
            yield assignment


def satisfies(scene: Scene, meaning: dict) -> bool:
    """Whether a scene makes the caption with this meaning true (partial descriptions count)."""
    return next(assignments(scene, meaning), None) is not None


MISS_REASONS = ("shape missing", "colour missing", "size missing", "binding", "count", "relation", "region")


def why_false(scene: Scene, meaning: dict) -> str | None:
    """Why a caption is false of a scene (one of :data:`MISS_REASONS`), or None when it is true.

    An attribute the caption names that no object has is "shape missing", "colour missing" or "size
    missing" (checked in that order); every named attribute present, but not on objects as the caption
    binds them (or too few objects), is "binding"; the objects right but the number of objects, a
    relation or an object's region wrong is "count", "relation" or "region". Read over the top-1
    retrievals of a model, it says what the model confuses.
    """
    if satisfies(scene, meaning):
        return None
    refs = meaning.get("objects", [])
    for attr in ("shape", "colour", "size"):
        present = {getattr(o, attr) for o in scene.objects}
        if any(r.get(attr) is not None and r[attr] not in present for r in refs):
            return f"{attr} missing"
    placed = {"objects": [{k: v for k, v in r.items() if k != "region"} for r in refs], "relations": [], "count": None}
    if not satisfies(scene, placed):
        return "binding"
    if meaning.get("count") is not None and meaning["count"] != len(scene.objects):
        return "count"
    if meaning.get("relations") and not satisfies(scene, {**placed, "relations": meaning["relations"]}):
        return "relation"
    return "region"


def caption_kind(meaning: dict) -> str:
    """What a caption asks of a model: single (one object), region (one object and where it is), list (every
    object of a scene), relation (two objects and how they are placed), or count (how many, and one of them)."""
    refs = meaning.get("objects", [])
    if meaning.get("relations"):
        return "relation"
    if meaning.get("count") is not None and meaning["count"] > len(refs):
        return "count"
    if len(refs) > 1:
        return "list"
    return "region" if any(r.get("region") for r in refs) else "single"


def describes(scene: Scene, meaning: dict) -> bool:
    """Whether the caption with this meaning could have been written for this scene.

    Stricter than :func:`satisfies`: the caption must be true, and of a form ShapesWorld writes for a
    scene like this one. A bare phrase or a list of objects names every object of the scene ("a red
    circle" is written for a scene holding only a red circle, not for one that also holds a blue star);
    captions with a relation or a count may leave objects out. Used to tell which pairs of a training
    batch match, so that two captions of the same kind of scene are not pushed apart as negatives.
    """
    if not satisfies(scene, meaning):
        return False
    if meaning.get("relations") or meaning.get("count") is not None:
        return True
    return len(meaning.get("objects", [])) == len(scene.objects)
