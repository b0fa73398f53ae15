"""Which captions of a batch describe which scenes, for every pair at once with array operations.

The same answer as :func:`~.semantics.describes` pair by pair; a training step asks it for a whole batch
(so two captions of the same kind of scene are not pushed apart as negatives), and the Python loop over
B x B pairs would cost more than the step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..scene import COLOURS, SHAPES, SIZES, Scene
from .semantics import describes

_REGION_PARTS = ("left", "right", "top", "bottom", "middle")
_RELATIONS = ("left_of", "right_of", "above", "below")
_PERMS = np.array(list(itertools.permutations(range(3))))  # (6, 3): object slot of each reference


def _encode_scenes(scenes: Sequence[Scene], n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """attrs (B, n, 3) int (-1: no object), x (B, n), y (B, n)."""
    lookup = (dict(zip(SHAPES, range(99))), dict(zip(COLOURS, range(99))), dict(zip(SIZES, range(99))))
    attrs = np.full((len(scenes), n, 3), -1, dtype=np.int64)
    xy = np.zeros((len(scenes), n, 2))
    for b, sc in enumerate(scenes):
        for k, o in enumerate(sc.objects[:n]):
            attrs[b, k] = (lookup[0][o.shape], lookup[1][o.colour], lookup[2][o.size])
            xy[b, k] = (o.x, o.y)
    return attrs, xy[..., 0], xy[..., 1]


def describes_matrix(scenes: Sequence[Scene], meanings: Sequence[dict]) -> np.ndarray:
    """(len(scenes), len(meanings)) bool: :func:`describes` for every pair, computed with array operations.

    Scenes have at most three objects and meanings at most three references (as ShapesWorld writes).
    """
    if any(len(sc.objects) > 3 for sc in scenes) or any(len(m.get("objects", [])) > 3 for m in meanings):
        return np.array([[describes(sc, m) for m in meanings] for sc in scenes])
    attrs, x, y = _encode_scenes(scenes)  # (B, 3, 3), (B, 3), (B, 3)
    B, T = len(scenes), len(meanings)
    lookup = (dict(zip(SHAPES, range(99))), dict(zip(COLOURS, range(99))), dict(zip(SIZES, range(99))))
    want = np.full((T, 3, 3), -1, dtype=np.int64)  # -1: any value
    active = np.zeros((T, 3), dtype=bool)
    region = np.zeros((T, 3, len(_REGION_PARTS)), dtype=bool)
    count = np.full(T, -1)
    structured = np.zeros(T, dtype=bool)  # has a relation or a count: may leave objects out
    rels = []  # (t, a, kind, b)
    for t, m in enumerate(meanings):
        for r, ref in enumerate(m.get("objects", [])):
            active[t, r] = True
            for a, key in enumerate(("shape", "colour", "size")):
                if ref.get(key) is not None:
                    want[t, r, a] = lookup[a].get(ref[key], -9)  # an unknown value matches nothing
            for part in (ref.get("region") or "").split():
                region[t, r, _REGION_PARTS.index(part)] = True
        if m.get("count") is not None:
            count[t] = m["count"]
        structured[t] = bool(m.get("relations")) or m.get("count") is not None
        rels.extend((t, a, _RELATIONS.index(kind), b) for a, kind, b in m.get("relations", []))
    exists = attrs[:, :, 0] >= 0  # (B, 3)
    n_obj, n_ref = exists.sum(1), active.sum(1)  # (B,), (T,)
    # does reference r of meaning t fit object o of scene b?  (B, T, r, o)
    attr_ok = ((want[None, :, :, None, :] == -1) | (want[None, :, :, None, :] == attrs[:, None, None, :, :])).all(-1)
    in_region = np.stack(
        [x < 0.5, x > 0.5, y < 0.5, y > 0.5, (x > 0.3) & (x < 0.7) & (y > 0.3) & (y < 0.7)], axis=-1
    )  # (B, 3, parts)
    region_ok = ~(region[None, :, :, None, :] & ~in_region[:, None, None, :, :]).any(-1)
    fit = attr_ok & region_ok & exists[:, None, None, :]
    fit |= ~active[None, :, :, None]  # references a meaning does not have fit anything
    rel_kind = np.stack(
        [
            x[:, :, None] < x[:, None, :],
            x[:, :, None] > x[:, None, :],
            y[:, :, None] < y[:, None, :],
            y[:, :, None] > y[:, None, :],
        ],
        axis=1,
    )  # (B, 4, o, o)
    ok_any = np.zeros((B, T), dtype=bool)
    for perm in _PERMS:  # reference r -> object perm[r]; the three slots are distinct, so it is injective
        ok = fit[:, :, 0, perm[0]] & fit[:, :, 1, perm[1]] & fit[:, :, 2, perm[2]]
        for t, a, kind, b in rels:
            ok[:, t] &= rel_kind[:, kind, perm[a], perm[b]]
        ok_any |= ok
    ok_any &= (count[None, :] < 0) | (count[None, :] == n_obj[:, None])
    ok_any &= n_ref[None, :] <= n_obj[:, None]
    return ok_any & (structured[None, :] | (n_ref[None, :] == n_obj[:, None]))
