"""The fusion classifier: gradients reach every encoder, for every strategy; predict is batch-size independent."""

import pytest
import torch

import mmfusion
from mmfusion.modules.fusions import FUSIONS


@pytest.mark.parametrize("strategy", list(FUSIONS))
def test_gradients_reach_every_encoder(strategy):
    torch.manual_seed(0)
    model = mmfusion.create_model(
        "fusion-small", strategy=strategy, modalities=("image", "audio", "text"), feature_dims={"text": 7},
        num_classes=4,
    ).train()  # fmt: skip
    if strategy == "gated":  # gates start closed: open them so the context modalities are used
        for name, p in model.named_parameters():
            if "gate" in name:
                p.data.fill_(0.5)
    feats = {"image": torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8), "audio": torch.randn(6, 64, 16),
             "text": torch.randn(6, 7)}  # fmt: skip
    torch.nn.functional.cross_entropy(model(feats), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    for m, enc in model.encoders.items():
        grads = [p.grad for p in enc.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{strategy}: no gradient into the {m} encoder"
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"{strategy}: zero gradient into the {m} encoder"


def test_predict_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    model = mmfusion.create_model("fusion-small", modalities=("text",), feature_dims={"text": 5}, num_classes=3)
    x = {"text": torch.randn(10, 5)}
    torch.testing.assert_close(model.predict(x, batch_size=3), model.predict(x, batch_size=10))
    assert model.training  # predict restores the mode it found
