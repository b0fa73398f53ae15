"""Weight inheritance: a student CLIP initialised from a subset of its teacher's weights (TinyCLIP: Wu et al.,
"TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", 2023, its manual inheritance).

The student must be of the same family (a native CLIP) and read the same inputs: the same image and patch size,
image normalisation, patch stem and pooling, activations, and the teacher's tokenizer (vocabulary and context).
Within that, it may be smaller in every direction, and each of its tensors is a slice of the teacher's:

- **blocks**: an evenly spaced subset of the teacher's, first and last included (``round(linspace(0, L-1, l))``:
  3 of 4 are blocks 0, 2, 3; 2 of 4 are 0, 3; 1 is block 0), as TinyCLIP's uniform layer selection;
- **attention heads and MLP channels** of each inherited block: the most important ones by the first-order
  estimate :mod:`mmfusion.train.prune` removes the least important by (measured on a few training batches with
  the teacher), or the leading ones (``distill.inherit_by=leading``); a head keeps its leading channels when the
  student's heads are narrower;
- **widths** (the residual stream, the embedding space): the leading channels, in every tensor that has them
  (patch and token embeddings, positions, layer norms, projections).

A student with the teacher's own config inherits every weight unchanged: the teacher's exact outputs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..data.tokenizer import Tokenizer
from ..models.clip import CLIP
from ..modules.layers import Block
from .prune import Importance, measure_importance

log = logging.getLogger(__name__)
TOWERS = {"image": ("visual", "vision"), "text": ("text", "text")}  # tower -> (model attribute, config field)


class InheritanceError(ValueError):
    """A student that cannot inherit from this teacher; the message names what differs."""


@dataclass
class Selection:
    """What one student block takes from the teacher: the teacher's block, and the heads and MLP channels kept
    (sorted indices into that block's)."""

    block: int
    heads: np.ndarray
    channels: np.ndarray


def evenly_spaced(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher's blocks a student of ``student_layers`` blocks inherits: evenly spaced, first and last kept."""
    return [int(i) for i in np.round(np.linspace(0, teacher_layers - 1, student_layers))]


def _check_native(teacher) -> None:
    if not isinstance(teacher, CLIP):
        kind = getattr(teacher, "family", type(teacher).__name__)
        raise InheritanceError(f"distill.inherit needs a native CLIP teacher (a run or checkpoint); this one is a "
                               f"{kind}: set distill.inherit=false to distil from it without inheriting")  # fmt: skip
    if str(getattr(teacher, "precision", "")).startswith("int8"):
        raise InheritanceError("distill.inherit: the teacher is kept as int8; inherit from the fp32 checkpoint")


def teacher_tokenizer(teacher) -> Tokenizer:
    """A copy of the teacher's tokenizer, for the student whose token embeddings it inherits."""
    _check_native(teacher)
    if teacher.tokenizer is None:
        raise InheritanceError("distill.inherit: the teacher has no tokenizer; inherit from a trained checkpoint")
    return copy.deepcopy(teacher.tokenizer)


def check_compatible(student: CLIP, teacher) -> None:
    """Raise :class:`InheritanceError` naming every difference that rules inheritance out."""
    _check_native(teacher)
    s, t = student.cfg, teacher.cfg
    same = [("vision.image_size", s.vision.image_size, t.vision.image_size),
            ("vision.patch_size", s.vision.patch_size, t.vision.patch_size),
            ("vision.stem", s.vision.stem, t.vision.stem), ("vision.pool", s.vision.pool, t.vision.pool),
            ("vision.act", s.vision.act, t.vision.act), ("text.act", s.text.act, t.text.act),
            ("text.vocab_size", s.text.vocab_size, t.text.vocab_size),
            ("text.context_length", s.text.context_length, t.text.context_length),
            ("text.eot_id", s.text.eot_id, t.text.eot_id),
            ("image_mean", tuple(s.image_mean), tuple(t.image_mean)),
            ("image_std", tuple(s.image_std), tuple(t.image_std))]  # fmt: skip
    if s.vision.stem == "conv":  # a conv stem's inner channels follow the width: it is copied whole
        same.append(("vision.width (a conv stem is copied whole)", s.vision.width, t.vision.width))
    at_most = [("embed_dim", s.embed_dim, t.embed_dim)]
    for attr, part in TOWERS.values():
        sb, tb = _blocks(student, attr), _blocks(teacher, attr)
        at_most += [(f"{part}.width", getattr(s, part).width, getattr(t, part).width),
                    (f"{part}.layers", len(sb), len(tb))]  # fmt: skip
        if len(sb) <= len(tb):
            for i, j in enumerate(evenly_spaced(len(sb), len(tb))):
                a, b = sb[i], tb[j]
                at_most += [
                    (f"{part} block {i} heads", a.attn.heads, b.attn.heads),
                    (f"{part} block {i} head width", a.attn.head_dim, b.attn.head_dim),
                    (f"{part} block {i} MLP channels", a.mlp.fc1.out_features, b.mlp.fc1.out_features),
                ]
    wrong = [f"{k} {a} (the teacher's is {b})" for k, a, b in same if a != b]
    wrong += [f"{k} {a} (more than the teacher's {b})" for k, a, b in at_most if a > b]
    if wrong:
        raise InheritanceError(
            "distill.inherit: the student cannot inherit the teacher's weights: its " + "; ".join(wrong)
            + ". Give the student the teacher's inputs and at most its sizes (--model.* overrides or another "
            "--student-preset), or set distill.inherit=false"
        )  # fmt: skip


def _blocks(model: CLIP, attr: str) -> list[Block]:
    return list(getattr(model, attr).transformer.blocks)


def _top(scores: np.ndarray | None, n: int) -> np.ndarray:
    """Sorted indices of the ``n`` highest ``scores`` (ties to the lower index), or the leading ``n``."""
    if scores is None:
        return np.arange(n)
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def select(student: CLIP, teacher: CLIP, importance: Importance | None) -> dict[str, list[Selection]]:
    """Per tower, what each student block inherits (``importance`` None: the leading heads and channels)."""
    out = {}
    for name, (attr, _) in TOWERS.items():
        sb, tb = _blocks(student, attr), _blocks(teacher, attr)
        chosen = []
        for i, j in enumerate(evenly_spaced(len(sb), len(tb))):
            heads = importance.heads[name][j] if importance else None
            mlp = importance.mlp[name][j] if importance else None
            chosen.append(Selection(j, _top(heads, sb[i].attn.heads), _top(mlp, sb[i].mlp.fc1.out_features)))
        out[name] = chosen
    return out


def _block_state(t: Block, s: Block, sel: Selection, width: int) -> dict[str, torch.Tensor]:
    """The teacher block ``t`` cut to the student block ``s``: its kept heads (leading channels of each), kept MLP
    channels, and the leading ``width`` channels of the residual stream."""
    c = torch.arange(width)
    hd_t, hd_s = t.attn.head_dim, s.attn.head_dim
    cols = torch.cat([h * hd_t + torch.arange(hd_s) for h in torch.as_tensor(sel.heads)])  # (heads_s * hd_s,)
    rows = torch.cat([cols + part * t.attn.inner for part in range(3)])  # q, k, v rows of the fused projection
    ch = torch.as_tensor(sel.channels)
    a, m = t.attn, t.mlp
    return {
        "ln1.weight": t.ln1.weight[c], "ln1.bias": t.ln1.bias[c],
        "attn.qkv.weight": a.qkv.weight[rows][:, c], "attn.qkv.bias": a.qkv.bias[rows],
        "attn.out.weight": a.out.weight[c][:, cols], "attn.out.bias": a.out.bias[c],
        "ln2.weight": t.ln2.weight[c], "ln2.bias": t.ln2.bias[c],
        "mlp.fc1.weight": m.fc1.weight[ch][:, c], "mlp.fc1.bias": m.fc1.bias[ch],
        "mlp.fc2.weight": m.fc2.weight[c][:, ch], "mlp.fc2.bias": m.fc2.bias[c],
    }  # fmt: skip


def _pooled(width_s: int, width_t: int, pool: str) -> torch.Tensor:
    """Rows of the pooled features the student keeps: the leading channels, of each half for ``cls+mean``."""
    c = torch.arange(width_s)
    return torch.cat([c, width_t + c]) if pool == "cls+mean" else c


def inherited_state(student: CLIP, teacher: CLIP, selection: dict[str, list[Selection]]) -> dict[str, torch.Tensor]:
    """The student's whole state dict cut from the teacher's (see the module's docstring)."""
    s, t = student.cfg, teacher.cfg
    e = torch.arange(s.embed_dim)
    wv, wt = s.vision.width, s.text.width
    cv, ct = torch.arange(wv), torch.arange(wt)
    tv, tt = teacher.visual, teacher.text
    rows = _pooled(wv, t.vision.width, s.vision.pool)
    state = {
        "visual.cls_token": tv.cls_token[cv], "visual.pos_embed": tv.pos_embed[:, cv],
        "visual.ln_pre.weight": tv.ln_pre.weight[cv], "visual.ln_pre.bias": tv.ln_pre.bias[cv],
        "visual.ln_post.weight": tv.ln_post.weight[rows], "visual.ln_post.bias": tv.ln_post.bias[rows],
        "visual.proj": tv.proj[rows][:, e],
        "text.token_embed.weight": tt.token_embed.weight[:, ct], "text.pos_embed": tt.pos_embed[:, ct],
        "text.ln_final.weight": tt.ln_final.weight[ct], "text.ln_final.bias": tt.ln_final.bias[ct],
        "text.proj": tt.proj[ct][:, e],
    }  # fmt: skip
    if s.vision.stem == "conv":
        state.update({f"visual.patch_embed.{k}": v for k, v in tv.patch_embed.state_dict().items()})
    else:
        state["visual.patch_embed.weight"] = tv.patch_embed.weight[cv]
    for name, (attr, part) in TOWERS.items():
        sb, tb = _blocks(student, attr), _blocks(teacher, attr)
        width = getattr(s, part).width
        for i, sel in enumerate(selection[name]):
            for k, v in _block_state(tb[sel.block], sb[i], sel, width).items():
                state[f"{attr}.transformer.blocks.{i}.{k}"] = v
    for k, v in teacher.logit.state_dict().items():  # the temperature; SigLIP's bias when both have one
        if k in student.logit.state_dict():
            state[f"logit.{k}"] = v
    return state


@torch.no_grad()
def _load(student: CLIP, state: dict[str, torch.Tensor]) -> None:
    own = student.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise InheritanceError(f"distill.inherit: no teacher weights for the student's {missing[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise InheritanceError(f"distill.inherit: {k} is {tuple(own[k].shape)} in the student, the teacher's "
                                   f"cut is {tuple(v.shape)}")  # fmt: skip
        own[k].copy_(v.detach().to(own[k]))


def inherit(student: CLIP, teacher, batches: Iterable | None = None) -> dict:
    """Initialise ``student`` in place from ``teacher``'s weights.

    Args:
        student: the student CLIP (built from its preset, with the teacher's tokenizer).
        teacher: the teacher; anything but a compatible native CLIP raises :class:`InheritanceError`.
        batches: (images, tokens, positives) batches to rank heads and MLP channels by importance on (as pruning
            does); None keeps the leading ones.

    Returns:
        What was inherited, for the student's ``meta``: per tower the teacher's blocks and each block's heads.
    """
    check_compatible(student, teacher)
    importance = None
    if batches is not None:
        importance = measure_importance(teacher, batches)
    selection = select(student, teacher, importance)
    _load(student, inherited_state(student, teacher, selection))
    summary = {
        "by": "importance" if importance is not None else "leading",
        **{name: {"blocks": [sel.block for sel in sels], "heads": [sel.heads.tolist() for sel in sels]}
           for name, sels in selection.items()},
    }  # fmt: skip
    log.info("inherited from the teacher (%s): image blocks %s, text blocks %s", summary["by"],
             summary["image"]["blocks"], summary["text"]["blocks"])  # fmt: skip
    return summary
