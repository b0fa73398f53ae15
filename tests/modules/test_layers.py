"""Attention's short-sequence path gives what the fused kernel gives, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from mmfusion.modules.layers import SHORT_SEQUENCE, Attention, attend


@pytest.mark.parametrize("length", [1, 8, SHORT_SEQUENCE, SHORT_SEQUENCE + 1])
def test_attend_equals_the_fused_kernel(length):
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 4, length, 16, requires_grad=True) for _ in range(3))
    ours = attend(q, k, v)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_masked_and_causal_attention_keep_their_meaning():
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 5, 32)
    causal = attn(x, causal=True)
    # with a causal mask the first token sees only itself: changing later tokens leaves it alone
    x2 = x.clone()
    x2[:, 1:] += 1.0
    torch.testing.assert_close(attn(x2, causal=True)[:, 0], causal[:, 0])
    assert not torch.allclose(attn(x2)[:, 0], attn(x)[:, 0])
    allowed = torch.tensor([True, True, False, False, False]).expand(2, 1, 5, 5)
    # keys 2.. masked out: changing tokens 2.. leaves the outputs at tokens 0 and 1 alone
    x3 = x2.where(torch.arange(5)[None, :, None] > 1, x)
    torch.testing.assert_close(attn(x3, mask=allowed)[:, :2], attn(x, mask=allowed)[:, :2])
