import pytest
import torch

from mmfusion.data.tokenizer import EOT_ID, PAD_ID, SOT_ID, Tokenizer
from tests.utils import shapes_tokenizer


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer(context_length=16)


def test_round_trip(tok):
    for text in [
        "a red circle to the left of a small blue square",
        "there is an orange star",
        "three shapes: a cyan cross, a white diamond and a purple triangle",
        "Zebra! ünïcode ok?",
    ]:
        ids = tok.encode(text)
        assert ids.shape == (1, 16)
        if (ids[0] == EOT_ID).any() and ids[0, -1] in (PAD_ID, EOT_ID) and len(tok.ids(text)) <= 14:
            assert tok.decode(ids[0]) == text.lower()


def test_layout_and_truncation(tok):
    ids = tok.encode(["a red circle", "a " * 40 + "circle"])
    assert ids[0, 0] == SOT_ID and ids[1, 0] == SOT_ID
    n = len(tok.ids("a red circle"))
    assert ids[0, n + 1] == EOT_ID and (ids[0, n + 2 :] == PAD_ID).all()
    assert ids[1, -1] == EOT_ID  # a long text is cut but still ends with <eot>


def test_bpe_merges_make_caption_words_single_tokens(tok):
    assert len(tok.ids("a circle")) == 2  # byte-level BPE merges " circle" with its leading space
    assert len(tok.ids("a red triangle")) == 3  # "a", " red", " triangle"


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path, 16)
    texts = ["a small red circle above a large green star", "what"]
    assert torch.equal(tok.encode(texts), again.encode(texts))
    assert again.vocab_size == tok.vocab_size


def test_errors_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path, 16)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(shapes_tokenizer().hf, 2)
