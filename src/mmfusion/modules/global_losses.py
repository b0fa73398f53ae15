"""Contrastive losses over the global batch of several processes (torch.distributed), equal to the losses of
:mod:`.losses` computed on the whole batch in one process.

With data parallelism each process embeds only its own part of the batch; a contrastive loss that used only
those as negatives would learn like a batch ``world_size`` times smaller. So the embeddings of every process are
all-gathered, with gradients: the gather's backward sums, into each process's own embeddings, the gradient
that every process's loss sends them.

Each process returns its *share* of the global loss, so that summing the shares' gradients over the processes
(:func:`mmfusion.train.distributed.sync_gradients` with ``average=False``) gives exactly the gradient of the
global loss:

- ``local_loss=True`` (the default, as open_clip's ``--local-loss``): a process scores only its own rows (its
  images against every text) and columns (its texts against every image), O(local x global) memory; its share
  is the sum of its rows' and columns' terms over the global counts.
- ``local_loss=False``: every process computes the whole global loss (O(global x global)); its share is that
  loss divided by the number of processes, since each process's gradient already carries every term once.

The batch may be split unevenly (a process with fewer texts, e.g. fewer hard negatives): embeddings are padded
to the largest part before the gather and the padding dropped after.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses import ContrastiveOutput, _check, clip_loss, siglip_loss, triplet_loss


def _gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``x`` (same shape on all), differentiable: the backward reduce-scatters (sums) the
    gradients of every process's copy back to the process it came from."""
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    gathered = wait_tensor(all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))
    return list(gathered.chunk(dist.get_world_size()))


def gather_rows(xs: list[torch.Tensor], sizes: list[list[int]]) -> list[torch.Tensor]:
    """For each ``x`` of ``xs`` (same width), the rows of every process in rank order, with gradients, in one
    collective; ``sizes[i]`` are the row counts of ``xs[i]`` on every process (parts are padded to the largest
    for the gather, and the padding dropped after)."""
    widths = [max(s) for s in sizes]
    padded = torch.cat([F.pad(x, (0, 0, 0, w - x.shape[0])) for x, w in zip(xs, widths, strict=True)])
    parts = _gather(padded)
    out, start = [], 0
    for w, counts in zip(widths, sizes, strict=True):
        out.append(torch.cat([p[start : start + n] for p, n in zip(parts, counts, strict=True)]))
        start += w
    return out


def part_sizes(*counts: int) -> list[list[int]]:
    """For each count given, its value on every process (one all-gather of a small tensor)."""
    mine = torch.tensor(counts, dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [[int(t[i]) for t in every] for i in range(len(counts))]


def _offset(sizes: list[int], rank: int) -> int:
    return sum(sizes[:rank])


def global_contrastive(
    kind: str,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.2,
    local_loss: bool = True,
) -> tuple[ContrastiveOutput, torch.Tensor]:
    """This process's share of a global-batch contrastive loss, and the global loss's value.

    Args:
        kind: ``clip``, ``siglip`` or ``triplet`` (hardest negatives), as in :mod:`.losses`.
        image, text: this process's (B_r, D) and (T_r, D) normalised embeddings.
        positives: the *global* (B, T) mask of matching pairs, rows and columns in rank order (the same on
            every process); None: row i matches text i (then every process has as many images as texts).
        local_loss: score only this process's rows and columns (see the module's note).

    Returns:
        (output, value): ``output.loss`` is the share to back-propagate; its accuracies are the global
        batch's; ``value`` is the global loss (detached, the same on every process), for logging.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    (img_sizes, txt_sizes) = part_sizes(image.shape[0], text.shape[0])
    all_img, all_txt = gather_rows([image, text.to(image.dtype)], [img_sizes, txt_sizes])
    pos = _check(all_img, all_txt, positives)
    if not local_loss:
        if kind == "clip":
            out = clip_loss(all_img, all_txt, logit_scale, positives)
        elif kind == "siglip":
            out = siglip_loss(all_img, all_txt, logit_scale, logit_bias, positives)
        elif kind == "triplet":
            out = triplet_loss(all_img, all_txt, margin, True, positives)
        else:
            raise ValueError(f"unknown loss {kind!r}; choose clip, siglip or triplet")
        value = out.loss.detach().clone()
        out.loss = out.loss / world  # every process computes it whole; the gradients are summed
        return out, value
    io, to = _offset(img_sizes, rank), _offset(txt_sizes, rank)
    rows, cols = pos[io : io + image.shape[0]], pos[:, to : to + text.shape[0]]  # (B_r, T) and (B, T_r)
    n_img, n_txt = all_img.shape[0], all_txt.shape[0]
    scale = logit_scale if kind != "triplet" else 1.0
    logits_r = scale * image @ all_txt.t()  # (B_r, T): this process's images against every text
    logits_c = scale * all_img @ text.t()  # (B, T_r): every image against this process's texts
    if kind == "clip":
        share = _clip_share(logits_r, logits_c, rows, cols, io, to, positives is None, n_img,
                            int(pos.any(0).sum()))  # fmt: skip
    elif kind == "siglip":  # each pair counted once, by its row
        share = -F.logsigmoid((rows.to(logits_r.dtype) * 2 - 1) * (logits_r + logit_bias)).sum() / n_img
    elif kind == "triplet":
        if n_img != n_txt:
            raise ValueError("the triplet loss pairs row i of images with row i of texts: one caption per image")
        share = _triplet_share(logits_r, logits_c, rows, cols, io, to, margin, n_img)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose clip, siglip or triplet")
    with torch.no_grad():  # the value and the accuracies of the global batch: one all-reduce of five numbers
        ri = torch.arange(image.shape[0], device=image.device)
        has = cols.any(0)
        right_c = cols[logits_c[:, has].argmax(0), has.nonzero().squeeze(1)].sum() if bool(has.any()) else 0
        sums = torch.stack([share.detach().double(), rows[ri, logits_r.argmax(1)].sum().double(),
                            torch.tensor(float(image.shape[0]), dtype=torch.float64, device=image.device),
                            torch.as_tensor(right_c, dtype=torch.float64, device=image.device),
                            has.sum().double()])  # fmt: skip
        dist.all_reduce(sums)
    i2t, t2i = (sums[1] / sums[2]).float(), (sums[3] / sums[4].clamp(min=1)).float()
    return ContrastiveOutput(share, i2t, t2i), sums[0].float()


def _clip_share(logits_r, logits_c, rows, cols, io: int, to: int, diagonal: bool, n_img: int, n_txt_with_image: int):
    if diagonal:  # row i matches text i: plain cross-entropy, no mask
        ri = torch.arange(logits_r.shape[0], device=logits_r.device)
        rt = torch.arange(logits_c.shape[1], device=logits_c.device)
        i2t = F.cross_entropy(logits_r, io + ri, reduction="sum")
        t2i = F.cross_entropy(logits_c.t(), to + rt, reduction="sum")
        return (i2t / n_img + t2i / max(1, n_txt_with_image)) / 2
    neg_inf = torch.finfo(logits_r.dtype).min
    i2t = torch.logsumexp(logits_r, 1) - torch.logsumexp(logits_r.masked_fill(~rows, neg_inf), 1)
    has_image = cols.any(0)  # pure negatives have no image to retrieve
    lt, ct = logits_c[:, has_image], cols[:, has_image]
    t2i = torch.logsumexp(lt, 0) - torch.logsumexp(lt.masked_fill(~ct, neg_inf), 0)
    return (i2t.sum() / n_img + t2i.sum() / max(1, n_txt_with_image)) / 2


def _triplet_share(sim_r, sim_c, rows, cols, io: int, to: int, margin: float, n: int):
    ri = torch.arange(sim_r.shape[0], device=sim_r.device)
    rt = torch.arange(sim_c.shape[1], device=sim_c.device)
    cost_txt = (margin + sim_r - sim_r[ri, io + ri][:, None]).clamp(min=0).masked_fill(rows, 0)  # image anchors
    cost_img = (margin + sim_c - sim_c[to + rt, rt][None, :]).clamp(min=0).masked_fill(cols, 0)  # text anchors
    return (cost_txt.max(1).values.sum() / n + cost_img.max(0).values.sum() / n) / 2
