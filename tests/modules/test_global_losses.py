"""Global-batch contrastive losses in 2 processes (gloo) against the same loss on the whole batch in one.

For CLIP, SigLIP and triplet, with ``local_loss`` on and off, with a positives mask (several captions per
image, a pure negative, texts split unevenly between the processes) and without: the loss value, the gradient
of every process's embeddings and of the temperature (summed over processes, as training syncs it) equal
the single-process global computation. Negative controls inject the known bugs (a gather without gradients,
a gather that drops the local part's gradient, labels without the rank's offset, an extra world-size
scaling) and must each break the equality.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmfusion.modules import global_losses
from mmfusion.modules.losses import clip_loss, siglip_loss, triplet_loss

D = 8
CASES = [(kind, local, masked) for kind in ("clip", "siglip", "triplet") for local in (True, False)
         for masked in (False, True) if not (kind == "triplet" and masked)]  # fmt: skip
BUGS = ["nograd", "droplocal", "offset0", "scaled"]


def _data(masked: bool):
    """The global batch: 6 images; 6 texts, or (masked) 9 = one caption each, then 2 more for image 0 and
    1 for image 4, and one pure negative; split 3/3 images, 5/4 texts."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, D, generator=g), dim=1)
    if not masked:
        return img, F.normalize(torch.randn(6, D, generator=g), dim=1), None, [3, 3], [3, 3]
    txt = F.normalize(torch.randn(9, D, generator=g), dim=1)
    pos = torch.zeros(6, 9, dtype=torch.bool)
    # texts in rank order: rank 0 has images 0-2 and texts 0-4, rank 1 images 3-5 and texts 5-8
    for i, t in [(0, 0), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (4, 7), (5, 8)]:
        pos[i, t] = True
    pos[:, 7] = False  # text 7 is a pure negative (no image), as a hard negative caption is
    pos[4, 6] = True
    return img, txt, pos, [3, 3], [5, 4]


def _reference(kind, img, txt, pos, scale0, bias0):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale, bias = torch.tensor(scale0, requires_grad=True), torch.tensor(bias0, requires_grad=True)
    if kind == "clip":
        out = clip_loss(img, txt, scale, pos)
    elif kind == "siglip":
        out = siglip_loss(img, txt, scale, bias, pos)
    else:
        out = triplet_loss(img, txt, 0.2, True, pos)
    out.loss.backward()
    return {"loss": out.loss.detach(), "img": img.grad, "txt": txt.grad, "acc": torch.stack([out.i2t_acc,
                                                                                            out.t2i_acc]),
            "scale": scale.grad if scale.grad is not None else torch.tensor(0.0),
            "bias": bias.grad if bias.grad is not None else torch.tensor(0.0)}  # fmt: skip


def _bugged(bug: str, world: int, rank: int) -> None:
    """Patches that put one known bug into the module (in this worker process only)."""
    if bug == "nograd":

        def gather(x):  # noqa: E306
            parts = [torch.zeros_like(x) for _ in range(world)]
            dist.all_gather(parts, x.detach().contiguous())
            return parts

        global_losses._gather = gather
    elif bug == "droplocal":

        def gather(x):  # noqa: E306
            parts = real(x)
            parts[rank] = parts[rank].detach()
            return parts

        real, global_losses._gather = global_losses._gather, gather
    elif bug == "offset0":
        global_losses._offset = lambda sizes, r: 0


def _worker(rank: int, world: int, rendezvous: str, out: str):
    """Every case, first as the module is, then with each bug patched in (and taken out again)."""
    # a file rendezvous: a port picked in advance can be taken by another socket before the store binds it
    # (it was, once, by a test's lingering gRPC reconnects), and the child then aborts
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    originals = (global_losses._gather, global_losses._offset)
    results = {}
    for bug in (None, *BUGS):
        global_losses._gather, global_losses._offset = originals
        if bug:
            _bugged(bug, world, rank)
        for case in CASES:
            results[(bug or "none", *case)] = _one_case(rank, world, bug, *case)
    if rank == 0:
        torch.save({"|".join(str(x) for x in k): v for k, v in results.items()}, out)
    dist.destroy_process_group()


def _one_case(rank: int, world: int, bug: str | None, kind: str, local: bool, masked: bool) -> dict:
    img, txt, pos, isz, tsz = _data(masked)
    io, to = sum(isz[:rank]), sum(tsz[:rank])
    mine_i = img[io : io + isz[rank]].clone().requires_grad_()
    mine_t = txt[to : to + tsz[rank]].clone().requires_grad_()
    scale, bias = torch.tensor(7.5, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    zi = mine_i.t().clone().t()  # non-contiguous, as features sliced from a wider tensor can be
    res, value = global_losses.global_contrastive(kind, zi, mine_t, scale, pos, logit_bias=bias, local_loss=local)
    share = res.loss * world if bug == "scaled" else res.loss
    if share.requires_grad:  # a bug can cut every path to the inputs
        share.backward()
    grads = torch.stack([scale.grad if scale.grad is not None else torch.tensor(0.0),
                         bias.grad if bias.grad is not None else torch.tensor(0.0)])  # fmt: skip
    dist.all_reduce(grads)  # the temperature's gradient, summed as training syncs gradients
    grad_i = mine_i.grad if mine_i.grad is not None else torch.zeros_like(mine_i)
    grad_t = mine_t.grad if mine_t.grad is not None else torch.zeros_like(mine_t)
    gi = [torch.zeros(isz[r], D) for r in range(world)]
    gt = [torch.zeros(max(tsz), D) for _ in range(world)]
    dist.all_gather(gi, grad_i)
    dist.all_gather(gt, F.pad(grad_t, (0, 0, 0, max(tsz) - tsz[rank])))
    return {"loss": value, "img": torch.cat(gi), "txt": torch.cat([g[:n] for g, n in zip(gt, tsz)]),
            "acc": torch.stack([res.i2t_acc, res.t2i_acc]),
            "scale": grads[0], "bias": grads[1]}  # fmt: skip


def _mismatch(got: dict, bug: str, kind: str, local: bool, masked: bool) -> float:
    img, txt, pos, _, _ = _data(masked)
    ref = _reference(kind, img, txt, pos, 7.5, -2.0)
    g = got[f"{bug}|{kind}|{local}|{masked}"]
    keys = ("loss", "img", "txt", "scale", "bias") + (("acc",) if bug == "none" else ())
    return max(float((g[k] - ref[k]).abs().max()) for k in keys)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    for attempt in range(2):  # a child killed by a stray connection to gloo's port (SIGABRT) is run again once
        folder = tmp_path_factory.mktemp("global")
        out = str(folder / "result.pt")
        try:
            mp.spawn(_worker, args=(2, str(folder / "rendezvous"), out), nprocs=2, join=True)
            break
        except mp.ProcessExitedException as e:
            if attempt or e.signal_name != "SIGABRT":
                raise
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("kind,local,masked", CASES)
def test_two_processes_equal_the_global_batch(two_processes, kind, local, masked):
    assert _mismatch(two_processes, "none", kind, local, masked) < 1e-5


@pytest.mark.parametrize("bug", BUGS)
def test_each_known_bug_breaks_the_equality(two_processes, bug):
    worst = max(_mismatch(two_processes, bug, *case) for case in CASES)
    assert worst > 1e-3, f"the {bug} bug went unnoticed"
    if bug in ("nograd", "offset0", "scaled"):  # these break the default, local_loss=True, on its own
        assert max(_mismatch(two_processes, bug, k, True, m) for k, lo, m in CASES if lo) > 1e-3
