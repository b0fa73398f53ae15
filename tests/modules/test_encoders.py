import pytest
import torch

from mmfusion.modules.encoders import TextConfig, TextTransformer, VisionConfig, VisionTransformer
from mmfusion.modules.layers import Attention


def test_vision_transformer_shapes_and_pooling():
    for pool in ("cls", "mean", "cls+mean"):
        vit = VisionTransformer(VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, pool=pool), 12)
        x = torch.randn(3, 3, 16, 16)
        assert vit.forward_features(x).shape == (3, 1 + 4, 32)
        assert vit(x).shape == (3, 12)


def test_patch_whitening_decorrelates_the_first_layer():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(image_size=16, patch_size=4, width=64, layers=1, heads=2), 8)
    mix = torch.randn(48, 48) * torch.linspace(0.05, 3.0, 48)  # correlated pixels of very different variance
    images = (torch.randn(200 * 16, 48) @ mix).view(200, 4, 4, 3, 4, 4).permute(0, 3, 1, 4, 2, 5)
    images = images.reshape(200, 3, 16, 16)  # each 4 x 4 patch is one row of the correlated samples
    random_init = vit.patch_embed.weight.clone()
    assert vit.init_patch_whitening(images, eps=1e-6) == 48  # 48 pixels per patch: 48 of the 64 filters
    assert torch.equal(vit.patch_embed.weight[48:], random_init[48:])
    with torch.no_grad():
        f = vit.patch_embed(images).flatten(2).transpose(1, 2).reshape(-1, 64)[:, :48]
    cov = torch.cov(f.T)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-4  # uncorrelated
    var = cov.diagonal()  # variance / (variance + eps): 1 but for the weakest directions
    assert var[:40].min() > 0.99 and var.max() < 1.001 and var[0] >= var[-1]


def test_patch_whitening_needs_the_patch_stem_and_enough_patches():
    cfg = dict(image_size=16, patch_size=4, width=32, layers=1, heads=2)
    with pytest.raises(ValueError, match="stem"):
        VisionTransformer(VisionConfig(**cfg, stem="conv"), 8).init_patch_whitening(torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 48 patches"):
        VisionTransformer(VisionConfig(**cfg), 8).init_patch_whitening(torch.randn(2, 3, 16, 16))


def test_text_transformer_is_causal_and_pools_at_eot():
    torch.manual_seed(0)
    txt = TextTransformer(TextConfig(vocab_size=50, context_length=10, width=32, layers=2, heads=2), 8).eval()
    a = torch.tensor([[2, 10, 11, 3, 0, 0, 0, 0, 0, 0]])
    b = a.clone()
    b[0, 5:] = torch.tensor([20, 21, 22, 23, 24])  # change only what comes after <eot>
    assert torch.allclose(txt(a), txt(b), atol=1e-6)
    c = a.clone()
    c[0, 1] = 12  # a token before <eot> changes the embedding
    assert not torch.allclose(txt(a), txt(c), atol=1e-4)
    assert torch.allclose(txt(a), txt(a[:, :4]), atol=1e-5)  # trailing padding can be trimmed


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    ref = attn.out((w @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_pooled_fast_paths_equal_the_full_computation_values_and_gradients():
    """forward() skips the work the pooled embedding does not need; it must not change a number."""
    torch.manual_seed(0)
    txt = TextTransformer(TextConfig(vocab_size=50, context_length=12, width=32, layers=2, heads=2), 8)
    tokens = torch.tensor(
        [
            [2, 10, 11, 3, 0, 0, 0, 0, 0, 0, 0, 0],
            [2, 10, 11, 12, 13, 14, 3, 0, 0, 0, 0, 0],
            [2, 15, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],  # truncated: no <eot>, pooled at the end
        ]
    )
    full = txt.forward_head(txt.forward_features(tokens), tokens)
    fast = txt(tokens)
    assert torch.allclose(fast, full, atol=1e-5)
    g_full = torch.autograd.grad(full.square().sum(), txt.token_embed.weight)[0]
    g_fast = torch.autograd.grad(fast.square().sum(), txt.token_embed.weight)[0]
    assert torch.allclose(g_fast, g_full, rtol=1e-4, atol=1e-4 * g_full.abs().max().item())
    for layers in (1, 3):
        vit = VisionTransformer(VisionConfig(image_size=16, patch_size=8, width=32, layers=layers, heads=2), 6)
        x = torch.randn(3, 3, 16, 16)
        assert torch.allclose(vit(x), vit.forward_head(vit.forward_features(x)), atol=1e-5)
