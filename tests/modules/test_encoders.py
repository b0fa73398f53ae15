import torch

from mmfusion.modules.encoders import TextConfig, TextTransformer, VisionConfig, VisionTransformer
from mmfusion.modules.layers import Attention


def test_vision_transformer_shapes_and_pooling():
    for pool in ("cls", "mean", "cls+mean"):
        vit = VisionTransformer(VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, pool=pool), 12)
        x = torch.randn(3, 3, 16, 16)
        assert vit.forward_features(x).shape == (3, 1 + 4, 32)
        assert vit(x).shape == (3, 12)


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
