"""Structured pruning of a CLIP: whole attention heads and MLP channels removed for real.

Importance is measured on data, as the first-order Taylor estimate of what removing a unit would change in the
contrastive loss (Michel et al., "Are Sixteen Heads Really Better than One?", 2019; Molchanov et al., 2019): a
mask of ones multiplies each head's output and each MLP hidden channel, and the importance of a unit is the mean
over batches of |dLoss/dmask|, which equals |sum of gradient x activation| over that unit's outputs. Scores are
normalised per layer (L2, as Michel et al.) so that one ranking spans a tower's layers, and the least important
fraction of each kind is removed, keeping at least one head and one eighth of the MLP channels in every block (and
each block's MLP width a multiple of 8, which the matrix kernels run faster on).

The pruned model is an ordinary model with a smaller config (``layer_heads``, ``layer_mlp`` per block) and
smaller weight matrices: it saves, loads, trains, evaluates, indexes, serves and exports like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..data.images import normalize_batch
from ..data.pairs import PairSampler, ShapesPairs, matches
from ..data.shapes import ShapesWorld
from ..eval.report import shapes_config_of
from ..models.clip import CLIP
from ..models.registry import build_model
from ..modules.encoders import TextTransformer, VisionTransformer
from ..modules.layers import Block
from ..modules.losses import clip_loss

log = logging.getLogger(__name__)
TOWERS = ("image", "text")
MIN_MLP_FRACTION = 8  # a block keeps at least hidden // 8 MLP channels
MLP_MULTIPLE = 8  # kept MLP widths are multiples of 8: the matrix kernels run 5-10% faster on them than on 143


@dataclass
class Importance:
    """Per tower and block: a score per head, and a score per MLP hidden channel (higher: more important)."""

    heads: dict[str, list[np.ndarray]]  # tower -> per block (heads,)
    mlp: dict[str, list[np.ndarray]]  # tower -> per block (hidden,)
    batches: int

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "heads": {t: [a.round(6).tolist() for a in v] for t, v in self.heads.items()},
            "mlp_mean": {t: [float(a.mean()) for a in v] for t, v in self.mlp.items()},
        }


def tower(model: CLIP, name: str) -> VisionTransformer | TextTransformer:
    if name not in TOWERS:
        raise ValueError(f"unknown tower {name!r}; choose from {', '.join(TOWERS)}")
    return model.visual if name == "image" else model.text


def _blocks(model: CLIP, name: str) -> list[Block]:
    return list(tower(model, name).transformer.blocks)


def batches_of(model: CLIP, sampler: PairSampler, n_batches: int, batch_size: int) -> Iterator[tuple]:
    """(images, tokens, positives) batches of ``sampler``'s pairs as the model takes them (the same for a seed)."""
    if model.tokenizer is None:
        raise ValueError("measuring importance needs the model's tokenizer: prune a trained run, not a preset")
    for b in range(n_batches):
        pairs = sampler.batch(b * batch_size, batch_size)
        images = normalize_batch(torch.from_numpy(np.stack([p.image for p in pairs])), model.cfg.image_mean,
                                 model.cfg.image_std)  # fmt: skip
        tokens = model.tokenizer.encode([t for p in pairs for t in p.texts])
        mask = matches(pairs, "meaning")
        yield images, tokens, torch.from_numpy(mask) if mask is not None else None


def shapes_batches(model: CLIP, n_batches: int, batch_size: int, seed: int = 0) -> Iterator[tuple]:
    """Batches of the ShapesWorld the model was trained on, from its validation split (every scene complexity,
    none of the test scenes)."""
    world = ShapesWorld(shapes_config_of(model))
    sampler = PairSampler(ShapesPairs(world, model.cfg.vision.image_size, split="val"), seed)
    return batches_of(model, sampler, n_batches, batch_size)


def measure_importance(model: CLIP, batches, towers: Sequence[str] = TOWERS) -> Importance:
    """Taylor importance of every head and MLP channel of ``towers`` over ``batches`` of (images, tokens,
    positives). The model is left unchanged (its gradients are cleared)."""
    masks: dict[tuple[str, int, str], torch.Tensor] = {}
    hooks, device = [], model.device

    def gate(key: tuple[str, int, str], repeat: int):
        def hook(_module, args):
            return (args[0] * masks[key].repeat_interleave(repeat),)

        return hook

    for name in towers:
        for i, block in enumerate(_blocks(model, name)):
            a = block.attn
            masks[(name, i, "heads")] = torch.ones(a.heads, device=device, requires_grad=True)
            masks[(name, i, "mlp")] = torch.ones(block.mlp.fc1.out_features, device=device, requires_grad=True)
            hooks.append(a.out.register_forward_pre_hook(gate((name, i, "heads"), a.head_dim)))
            hooks.append(block.mlp.fc2.register_forward_pre_hook(gate((name, i, "mlp"), 1)))
    sums = {k: torch.zeros_like(m) for k, m in masks.items()}
    was_training, n = model.training, 0
    model.eval()  # no dropout: the same scores for the same data
    try:
        for images, tokens, positives in batches:
            out = model(images, tokens)
            positives = positives.to(device) if positives is not None else None
            loss = clip_loss(out.image_embeds, out.text_embeds, model.logit(), positives).loss
            grads = torch.autograd.grad(loss, list(masks.values()))
            for k, g in zip(masks, grads, strict=True):
                sums[k] += g.abs()
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("no batches to measure importance on")
    heads = {t: [(sums[(t, i, "heads")] / n).cpu().numpy() for i in range(len(_blocks(model, t)))] for t in towers}
    mlp = {t: [(sums[(t, i, "mlp")] / n).cpu().numpy() for i in range(len(_blocks(model, t)))] for t in towers}
    return Importance(heads, mlp, n)


def choose(scores: list[np.ndarray], ratio: float, minimum: Sequence[int], multiple: int = 1) -> list[np.ndarray]:
    """Per block, the sorted indices of the units kept when the ``ratio`` least important of all blocks' units
    (scores L2-normalised per block) go, each block keeping at least ``minimum[i]``; with ``multiple``, each
    block's count is then rounded down to a multiple of it (its least important go), but not below ``minimum``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a pruning ratio is a fraction in [0, 1), got {ratio}")
    normed = [s / (np.linalg.norm(s) + 1e-12) for s in scores]
    total = sum(len(s) for s in scores)
    budget = int(round(ratio * total))
    removable = [len(s) - m for s, m in zip(scores, minimum, strict=True)]
    order = sorted(((float(v), i, j) for i, s in enumerate(normed) for j, v in enumerate(s)), key=lambda t: t[:3])
    drop: list[set[int]] = [set() for _ in scores]
    for _, i, j in order:
        if budget == 0:
            break
        if len(drop[i]) < removable[i]:
            drop[i].add(j)
            budget -= 1
    kept = []
    for i, s in enumerate(scores):
        keep = np.asarray([j for j in range(len(s)) if j not in drop[i]], dtype=np.int64)
        n = max(minimum[i], len(keep) // multiple * multiple)
        if n < len(keep):  # the least important of the kept go first
            keep = np.sort(keep[np.argsort(-normed[i][keep], kind="stable")[:n]])
        kept.append(keep)
    return kept


def _slice_block(block: Block, heads: np.ndarray, channels: np.ndarray) -> dict[str, torch.Tensor]:
    """The block's weights restricted to the kept heads and MLP channels (state-dict keys under the block)."""
    a, hd = block.attn, block.attn.head_dim
    cols = torch.as_tensor(np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in heads]))
    rows = torch.cat([cols + part * a.inner for part in range(3)])  # q, k, v rows of the fused projection
    ch = torch.as_tensor(channels)
    out = {k: v.detach().clone() for k, v in block.state_dict().items()}
    out["attn.qkv.weight"], out["attn.qkv.bias"] = (
        a.qkv.weight[rows].detach().clone(),
        a.qkv.bias[rows].detach().clone(),
    )
    out["attn.out.weight"] = a.out.weight[:, cols].detach().clone()
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    out["mlp.fc1.weight"], out["mlp.fc1.bias"] = fc1.weight[ch].detach().clone(), fc1.bias[ch].detach().clone()
    out["mlp.fc2.weight"] = fc2.weight[:, ch].detach().clone()
    return out


def prune(model: CLIP, importance: Importance, heads: float = 0.3, mlp: float = 0.3,
          towers: Sequence[str] | None = None) -> tuple[CLIP, dict]:  # fmt: skip
    """A new, smaller model without the least important ``heads`` and ``mlp`` fractions of each tower's units.

    Returns the model (eval mode, same tokenizer and meta) and a summary of what each block kept.
    """
    towers = list(towers or importance.heads)
    cfg, state, summary = model.cfg, {}, {}
    for name in towers:
        blocks = _blocks(model, name)
        keep_heads = choose(importance.heads[name], heads, [1] * len(blocks))
        minimum = [max(1, len(s) // MIN_MLP_FRACTION) for s in importance.mlp[name]]
        keep_mlp = choose(importance.mlp[name], mlp, minimum, MLP_MULTIPLE if mlp > 0 else 1)
        prefix = "visual" if name == "image" else "text"
        for i, block in enumerate(blocks):
            for k, v in _slice_block(block, keep_heads[i], keep_mlp[i]).items():
                state[f"{prefix}.transformer.blocks.{i}.{k}"] = v
        part = "vision" if name == "image" else "text"
        tcfg = replace(getattr(cfg, part), layer_heads=[len(h) for h in keep_heads],
                       layer_mlp=[len(c) for c in keep_mlp])  # fmt: skip
        cfg = replace(cfg, **{part: tcfg})
        summary[name] = {
            "heads": [f"{len(h)}/{b.attn.heads}" for h, b in zip(keep_heads, blocks, strict=True)],
            "mlp": [f"{len(c)}/{b.mlp.fc1.out_features}" for c, b in zip(keep_mlp, blocks, strict=True)],
        }
    pruned = build_model("clip", cfg, model.tokenizer, name=model.name)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full.update(state)
    pruned.load_state_dict(full)
    pruned.meta = dict(getattr(model, "meta", None) or {})
    pruned.meta["pruned"] = {"heads": heads, "mlp": mlp, "towers": towers, "kept": summary}
    summary["parameters"] = {"before": count_parameters(model), "after": count_parameters(pruned)}
    return pruned.eval(), summary


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
