import pytest
import torch

from mmfusion.modules.encoders import AudioEncoder, AudioEncoderConfig

TINY = {"n_mels": 16, "width": 24, "channels": 4, "layers": 2}


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("input_norm", ["batch", "utterance", "none"])
def test_shapes(norm, input_norm):
    enc = AudioEncoder(AudioEncoderConfig(**TINY, norm=norm, input_norm=input_norm))
    x = torch.randn(3, 16, 21)
    assert enc.forward_tokens(x).shape == (3, 6, 24)  # 21 frames / 2 / 2, rounded up
    assert enc(x).shape == (3, 24) and enc.width == 24
    assert torch.allclose(enc(x), enc.forward_head(enc.forward_features(x)))
    one = AudioEncoder(AudioEncoderConfig(**{**TINY, "time_stride": 1}))
    assert one.forward_tokens(x).shape == (3, 21, 24)


def test_gradients_reach_every_parameter():
    enc = AudioEncoder(AudioEncoderConfig(**TINY))
    enc(torch.randn(4, 16, 20)).pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_utterance_norm_ignores_level_and_batch_norm_keeps_it():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 20)
    utt = AudioEncoder(AudioEncoderConfig(**TINY, input_norm="utterance")).eval()
    assert torch.allclose(utt(x), utt(x + 3.0), atol=1e-4)  # louder by a constant factor = + log(factor)
    bn = AudioEncoder(AudioEncoderConfig(**TINY, input_norm="batch")).train()
    bn(x * 2 + 1)  # running statistics move away from the initial (0, 1)
    bn.eval()
    assert not torch.allclose(bn(x), bn(x + 3.0), atol=1e-3)


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(**TINY))
    head = torch.nn.Linear(24, 3)
    x, y = torch.randn(6, 16, 20), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(head(enc(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_config_and_input_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        AudioEncoder(AudioEncoderConfig(n_mels=20, layers=3))
    enc = AudioEncoder(AudioEncoderConfig(**TINY))
    with pytest.raises(ValueError, match="log-mel"):
        enc(torch.randn(2, 32, 10))
