"""Zero-shot labels, concept flags and caption choice over any Embedder."""

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfusion.cli.main import main
from mmfusion.tasks import ZeroShotClassifier, best_caption, moderate, read_labels, read_templates
from tests.backends.tiny_hf import tiny_siglip

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourEmbedder:
    """Images map to their mean colour, texts to the colour words they hold plus a little per-word noise
    (so prompt templates matter); counts its text calls to show the cache works."""

    name = "colour"
    embed_dim = 3
    fingerprint = "colour-v1"

    def __init__(self):
        self.text_calls = 0

    def encode_image(self, images, normalize=True):
        z = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in images])) + 1.0
        return F.normalize(z, dim=-1)

    def encode_text(self, texts, normalize=True):
        self.text_calls += 1
        out = []
        for t in texts:
            v = torch.tensor([255.0 * (w in t) for w in COLOURS]) + 1.0
            v += torch.tensor([zlib.crc32(w.encode()) % 7 for w in t.split()], dtype=torch.float32).sum() * 0.5
            out.append(v)
        return F.normalize(torch.stack(out), dim=-1)


def _img(colour):
    return Image.new("RGB", (8, 8), COLOURS[colour])


def test_labels_rank_and_the_cache_is_reused(tmp_path):
    emb = ColourEmbedder()
    clf = ZeroShotClassifier(emb, ["red", "green", "blue"], cache_dir=tmp_path)
    preds = clf.classify([_img("blue"), _img("red")], k=2)
    assert preds[0][0].label == "blue"
    assert preds[1][0].label == "red" and len(preds[1]) == 2
    assert preds[0][0].score > preds[0][1].score
    probs = clf.scores([_img("green")])
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))
    calls = emb.text_calls
    again = ZeroShotClassifier(emb, "red,green,blue", cache_dir=tmp_path)
    torch.testing.assert_close(again.label_embeddings, clf.label_embeddings)
    assert again.cached and emb.text_calls == calls  # read from disk: no text embedded
    other = ZeroShotClassifier(emb, "red,green,blue", templates="a {}", cache_dir=tmp_path)
    assert not torch.allclose(other.label_embeddings, clf.label_embeddings)  # templates are part of the key
    for f in tmp_path.glob("*.npy"):
        f.write_bytes(b"damaged")
    fresh = ZeroShotClassifier(emb, "red,green,blue", cache_dir=tmp_path)
    torch.testing.assert_close(fresh.label_embeddings, clf.label_embeddings)
    assert not fresh.cached


def test_flags_and_best_caption():
    emb = ColourEmbedder()
    flags = moderate(emb, [_img("red"), _img("green")], ["red", "blue"], threshold=0.9, templates="{}")
    assert [p.label for p in flags[0]] == ["red"] and flags[1] == []
    ranked = best_caption(emb, _img("green"), ["a red square", "a green square", "a blue square"])
    assert ranked[0].label == "a green square"
    assert [p.score for p in ranked] == sorted((p.score for p in ranked), reverse=True)


def test_siglip_scores_each_label_with_its_own_sigmoid(tmp_path):
    import mmfusion

    emb = mmfusion.load(tiny_siglip(tmp_path / "siglip"))
    clf = ZeroShotClassifier(emb, ["red", "dog", "sunset"], cache_dir=None)
    img = [_img("red")]
    probs = clf.scores(img)
    z = emb.encode_image(img)
    expected = torch.sigmoid(emb.logits(z, clf.label_embeddings))
    torch.testing.assert_close(probs, expected)
    flags = clf.flag(img, threshold=0.0)
    assert {p.label for p in flags[0]} == {"red", "dog", "sunset"}  # every sigmoid is >= 0


def test_label_and_template_input_is_checked(tmp_path):
    (tmp_path / "labels.txt").write_text("# animals\ncat\n\ndog\n")
    assert read_labels(str(tmp_path / "labels.txt")) == ["cat", "dog"]
    with pytest.raises(ValueError, match="no labels"):
        read_labels(" , ")
    with pytest.raises(ValueError, match="repeat"):
        read_labels("cat,dog,cat")
    with pytest.raises(ValueError, match=r"\{\}"):
        read_templates("a photo")
    assert read_templates("a {}|the {}") == ("a {}", "the {}")


def test_cli_classify(tmp_path, capsys):
    from tests.utils import tiny_clip

    model = tiny_clip(tmp_path / "clip")
    _img("red").save(tmp_path / "red.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    argv = ["classify", str(tmp_path / "red.png"), str(tmp_path / "broken.jpg"), "--model", str(model)]
    rc = main(argv + ["--labels", "red,green,blue", "-k", "2", "--json", "--no-cache"])
    out, err = capsys.readouterr()
    assert rc == 1 and "broken.jpg" in err
    data = json.loads(out)
    assert data[0]["image"].endswith("red.png") and len(data[0]["labels"]) == 2
    assert abs(sum(x["score"] for x in data[0]["labels"])) <= 1.0 + 1e-6
    rc = main(argv[:2] + ["--model", str(model), "--labels", "red,green", "--threshold", "-1", "--no-cache"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "red" in out and "green" in out
