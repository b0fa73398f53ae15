import pytest
import torch
import torch.nn.functional as F

from mmfusion.eval.retrieval import retrieval_metrics, semantic_precision
from mmfusion.eval.zeroshot import class_embeddings, confusion_matrix, fill_template, topk_accuracy


def test_recall_and_ranks_hand_checked():
    img = torch.eye(3)
    # texts 0,1 describe image 0; text 2 image 1; text 3 image 2
    txt = F.normalize(torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    m = retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # every image's best own text scores 1.0, above all others (text 0 scores 0.995 for image 1)
    assert m["i2t_R@1"] == 1.0
    # text 0 ranks image 1 (0.995) above image 0 (0.0995): rank 1
    assert m["t2i_R@1"] == pytest.approx(3 / 4) and m["t2i_R@2"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx((2 + 1 + 1 + 1) / 4)


def test_ties_are_not_broken_against_the_model():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two identical images
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the same caption for both
    m = retrieval_metrics(img, txt, torch.tensor([0, 1]), ks=(1,))
    assert m["t2i_R@1"] == 1.0 and m["i2t_R@1"] == 1.0


def test_semantic_precision_counts_true_images():
    img = torch.eye(4)
    txt = F.normalize(torch.tensor([[1.0, 0.9, 0.0, 0.0]]), dim=-1)  # ranks image 0, then 1, then 2/3
    holds = lambda t, i: i in (0, 2)  # noqa: E731
    m = semantic_precision(img, txt, holds, ks=(1, 2))
    assert m["semantic_P@1"] == 1.0 and m["semantic_P@2"] == 0.5


def test_prompt_templates_and_ensemble():
    assert fill_template("a photo of a {}.", "orange star") == "a photo of an orange star."
    assert fill_template("a {}", "red circle") == "a red circle"
    assert fill_template("a {}", "orange star") == "an orange star"
    assert fill_template("itap of a {}", "apple") == "itap of an apple"

    class Echo:  # embeds "x" texts by their length, to check the averaging
        embed_dim = 2
        name = "echo"

        def encode_text(self, texts, normalize=True):
            return F.normalize(torch.tensor([[float(len(t)), 1.0] for t in texts]), dim=-1)

    emb = class_embeddings(Echo(), ["a", "bb"], ["{}", "{}!"])
    assert emb.shape == (2, 2) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\{\}"):
        class_embeddings(Echo(), ["a"], ["no slot"])


def test_topk_and_confusion():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([0, 1]), ks=(1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}
    cm = confusion_matrix(logits.argmax(1).numpy(), torch.tensor([0, 1]).numpy(), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
