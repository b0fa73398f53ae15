"""Losses against straightforward loop references and hand-checked small cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfusion.modules.losses import LogitScale, clip_loss, positives_from_ids, siglip_loss, triplet_loss


def _emb(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _clip_reference(img, txt, scale, pos):
    """-log of the probability mass on positives, per row and per column, by explicit loops."""
    n = img.shape[0]
    total_i, total_t = 0.0, 0.0
    for i in range(n):
        logits = [scale * float(img[i] @ txt[j]) for j in range(n)]
        z = sum(math.exp(v) for v in logits)
        total_i += -math.log(sum(math.exp(logits[j]) for j in range(n) if pos[i][j]) / z)
    for j in range(n):
        logits = [scale * float(img[i] @ txt[j]) for i in range(n)]
        z = sum(math.exp(v) for v in logits)
        total_t += -math.log(sum(math.exp(logits[i]) for i in range(n) if pos[i][j]) / z)
    return (total_i / n + total_t / n) / 2


def test_clip_loss_matches_loop_reference():
    img, txt = _emb()
    eye = torch.eye(6, dtype=torch.bool)
    out = clip_loss(img, txt, 10.0)
    assert out.loss.item() == pytest.approx(_clip_reference(img, txt, 10.0, eye.tolist()), rel=1e-5)


def test_clip_loss_hand_checked_two_pairs():
    # perfectly aligned orthogonal pairs: logits = s * I, loss = log(1 + e^-s) for every row and column
    img = torch.eye(2)
    out = clip_loss(img, img.clone(), 2.0)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    assert out.i2t_acc.item() == 1.0 and out.t2i_acc.item() == 1.0


def test_clip_loss_multi_positive_matches_reference_and_reduces_to_standard():
    img, txt = _emb()
    ids = torch.tensor([0, 1, 0, 2, 3, 1])
    pos = positives_from_ids(ids)
    out = clip_loss(img, txt, 5.0, pos)
    assert out.loss.item() == pytest.approx(_clip_reference(img, txt, 5.0, pos.tolist()), rel=1e-5)
    diag_only = clip_loss(img, txt, 5.0, torch.eye(6, dtype=torch.bool))
    assert diag_only.loss.item() == pytest.approx(clip_loss(img, txt, 5.0).loss.item(), rel=1e-6)


def test_multi_positive_does_not_push_a_repeated_caption_away():
    # two images with the same caption text: with the mask, the loss can reach its minimum
    img = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    pos = positives_from_ids(torch.tensor([0, 0, 1]))
    assert clip_loss(img, txt, 50.0, pos).loss.item() < 0.01
    assert clip_loss(img, txt, 50.0).loss.item() == pytest.approx(2 / 3 * math.log(2), rel=1e-3)  # split 50:50


def test_siglip_loss_matches_reference():
    img, txt = _emb()
    scale, bias = 10.0, -3.0
    ref = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            ref += math.log(1 + math.exp(-z * (scale * float(img[i] @ txt[j]) + bias)))
    out = siglip_loss(img, txt, scale, bias)
    assert out.loss.item() == pytest.approx(ref / 6, rel=1e-5)


def test_triplet_loss_hardest_matches_reference():
    img, txt = _emb(seed=3)
    sim = img @ txt.t()
    ref_i = sum(max(max(0.0, 0.2 + float(sim[i, j] - sim[i, i])) for j in range(6) if j != i) for i in range(6)) / 6
    ref_t = sum(max(max(0.0, 0.2 + float(sim[i, j] - sim[j, j])) for i in range(6) if i != j) for j in range(6)) / 6
    out = triplet_loss(img, txt, margin=0.2, hardest=True)
    assert out.loss.item() == pytest.approx((ref_i + ref_t) / 2, rel=1e-5)


def test_triplet_loss_is_zero_when_margin_is_met():
    img = torch.eye(3)
    assert triplet_loss(img, img.clone(), margin=0.5).loss.item() == 0.0


def test_accuracies_count_positive_hits():
    img = torch.eye(3)
    txt = torch.stack([torch.eye(3)[0], torch.eye(3)[0], torch.eye(3)[2]])  # text 1 points at image 0
    out = clip_loss(img, txt, 10.0)
    assert out.i2t_acc.item() == pytest.approx(2 / 3)  # image 1's best text is text 0 or 1 (tie: argmax first)
    assert out.t2i_acc.item() == pytest.approx(2 / 3)


def test_bad_shapes_and_masks_are_rejected():
    img, txt = _emb()
    with pytest.raises(ValueError, match="positives mask"):
        clip_loss(img, txt[:3], 1.0)
    with pytest.raises(ValueError, match="a match in every row"):
        clip_loss(img, txt, 1.0, torch.zeros(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="one caption per image"):
        triplet_loss(img, torch.cat([txt, txt]), positives=torch.ones(6, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        clip_loss(img, txt[:, :3], 1.0)


def _rect_reference(img, txt, scale, pos):
    b, t = len(img), len(txt)
    logits = [[scale * float(img[i] @ txt[j]) for j in range(t)] for i in range(b)]
    rows = (
        sum(
            -math.log(sum(math.exp(logits[i][j]) for j in range(t) if pos[i][j]) / sum(math.exp(v) for v in logits[i]))
            for i in range(b)
        )
        / b
    )
    cols = (
        sum(
            -math.log(
                sum(math.exp(logits[i][j]) for i in range(b) if pos[i][j])
                / sum(math.exp(logits[i][j]) for i in range(b))
            )
            for j in range(t)
        )
        / t
    )
    return (rows + cols) / 2


def test_pure_negative_texts_count_only_from_image_to_text():
    img, _ = _emb(n=3)
    _, txt = _emb(n=5, seed=9)
    pos = torch.zeros(3, 5, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = True  # texts 3 and 4 are hard negatives with no image
    out = clip_loss(img, txt, 5.0, pos)
    logits = [[5.0 * float(img[i] @ txt[j]) for j in range(5)] for i in range(3)]
    rows = sum(-math.log(math.exp(logits[i][i]) / sum(math.exp(v) for v in logits[i])) for i in range(3)) / 3
    cols = sum(-math.log(math.exp(logits[j][j]) / sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)) / 3
    assert out.loss.item() == pytest.approx((rows + cols) / 2, rel=1e-5)


def test_several_captions_per_image():
    img, _ = _emb(n=4)
    _, txt = _emb(n=8, seed=5)
    pos = torch.zeros(4, 8, dtype=torch.bool)
    for j in range(8):
        pos[j // 2, j] = True  # captions 2i and 2i+1 belong to image i
    out = clip_loss(img, txt, 7.0, pos)
    assert out.loss.item() == pytest.approx(_rect_reference(img, txt, 7.0, pos.tolist()), rel=1e-5)
    assert siglip_loss(img, txt, 7.0, -2.0, pos).loss.shape == ()


def test_logit_scale_init_clamp_and_gradient():
    ls = LogitScale()
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-5)
    img, txt = _emb()
    clip_loss(img, txt, ls()).loss.backward()
    assert ls.log_scale.grad is not None and ls.log_scale.grad.abs() > 0
    with torch.no_grad():
        ls.log_scale.fill_(10.0)
    assert ls().item() == pytest.approx(100.0, rel=1e-5)  # clamped at ln(100) in the forward
    ls.clamp_()
    assert ls.log_scale.item() == pytest.approx(math.log(100))
    fixed = LogitScale(learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters()) and fixed().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert LogitScale(init=math.log(10), init_bias=-10.0).bias.item() == -10.0
