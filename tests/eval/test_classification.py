import numpy as np
import pytest
import torch

from mmfusion.eval.classification import classification_metrics, confusion_matrix
from mmfusion.modules.losses import focal_loss


def test_metrics_on_a_hand_made_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = classification_metrics(y, p, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: 0: 2*1/(2+2)=0.5; 1: 2*2/(2+3)=0.8; 2: 2*1/(2+1)=0.667
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_examples():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    w = torch.rand(5) + 0.5
    ce = torch.nn.functional.cross_entropy(logits, y, weight=w)
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0, weight=w), ce)
    easy = torch.tensor([[10.0, 0.0]]), torch.tensor([0])
    hard = torch.tensor([[0.0, 0.5]]), torch.tensor([0])
    ratio_easy = focal_loss(*easy, gamma=2.0) / torch.nn.functional.cross_entropy(*easy)
    ratio_hard = focal_loss(*hard, gamma=2.0) / torch.nn.functional.cross_entropy(*hard)
    assert ratio_easy < 1e-6 < ratio_hard < 1
