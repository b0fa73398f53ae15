"""ShapesWorld VQA questions with known answers: colour, shape, size, count, existence and spatial relations.

A question only refers to an object in a way that picks it out uniquely, so every answer is certain.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..scene import COLOURS, Obj, Scene, all_combos
from .captions import noun_phrase, stated_relations
from .sampling import ShapesConfig
from .semantics import relation_holds


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str  # colour, shape, count, exist, relation, size


def _unique_ref(o: Obj, objs: tuple[Obj, ...]) -> str:
    """The shortest 'the ...' phrase that picks out exactly this object."""
    others = [p for p in objs if p is not o]
    if not any(p.shape == o.shape for p in others):
        return f"the {o.shape}"
    if not any(p.shape == o.shape and p.colour == o.colour for p in others):
        return f"the {o.colour} {o.shape}"
    return f"the {o.size} {o.colour} {o.shape}"


def make_questions(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig | None = None) -> list[QA]:
    """Questions with known answers: colour, shape, size, count, existence and spatial relations."""
    objs = scene.objects
    qas: list[QA] = []
    target = objs[rng.integers(len(objs))]
    if sum(p.shape == target.shape for p in objs) == 1:
        qas.append(QA(f"what colour is the {target.shape}?", target.colour, "colour"))
    if sum(p.colour == target.colour for p in objs) == 1:
        qas.append(QA(f"what shape is the {target.colour} object?", target.shape, "shape"))
    qas.append(QA(f"is {_unique_ref(target, objs)} small or large?", target.size, "size"))
    if rng.random() < 0.5:
        qas.append(QA("how many objects are there?", str(len(objs)), "count"))
    else:
        colour = list(COLOURS)[rng.integers(len(COLOURS))] if rng.random() < 0.5 else target.colour
        qas.append(QA(f"how many {colour} objects are there?", str(sum(p.colour == colour for p in objs)), "count"))
    if rng.random() < 0.5:
        qas.append(QA(f"is there {noun_phrase({'colour': target.colour, 'shape': target.shape})}?", "yes", "exist"))
    else:
        present = {p.name for p in objs}
        pool = [c for c in all_combos() if c not in present and c not in (cfg.heldout if cfg else ())]
        absent = pool[rng.integers(len(pool))]
        colour, shape = absent.split()
        qas.append(QA(f"is there {noun_phrase({'colour': colour, 'shape': shape})}?", "no", "exist"))
    for a, b in itertools.permutations(objs, 2):
        rels = stated_relations(a, b)
        for rel in rels:
            # "what is left of B?" only when exactly one object is left of B at all
            if sum(relation_holds(p, rel, b) for p in objs if p is not b) == 1:
                phrase = {
                    "left_of": "to the left of",
                    "right_of": "to the right of",
                    "above": "above",
                    "below": "below",
                }[rel]
                qas.append(QA(f"what is {phrase} {_unique_ref(b, objs)}?", a.name, "relation"))
                break
        if len(qas) >= 7:
            break
    return qas
