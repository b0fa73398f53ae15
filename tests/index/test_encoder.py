"""The query encoder: one way from texts and images to vectors for the CLI, the service and indexing."""

import numpy as np
import pytest
import torch

from mmfusion.data.prompts import PHOTO_TEMPLATES
from mmfusion.data.tokenizer import PAD_ID
from mmfusion.index import Index, QueryEncoder, load_embedder
from mmfusion.index.encoder import split_by_length
from tests.utils import photo, random_image, tiny_clip

TEXTS = ["red", "a big blue square", "two small green circles on the left", "yellow triangle", "a red circle"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model") / "clip")


@pytest.fixture(scope="module")
def encoder(model_dir):
    return QueryEncoder(load_embedder(model_dir))


def _model_texts(model, texts):
    with torch.inference_mode():
        z = model.encode_text(list(texts)).float()
    return (z / z.norm(dim=-1, keepdim=True)).numpy()


def test_text_vectors_are_normalised_and_the_models(encoder):
    z = encoder.encode_texts(TEXTS)
    assert z.shape == (len(TEXTS), encoder.embed_dim) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert np.allclose(z, _model_texts(encoder.embedder, TEXTS), atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, encoder.embed_dim)


def test_ensemble_is_the_normalised_mean_over_photo_prompts(encoder):
    plain, ens = encoder.encode_texts(["red circle"]), encoder.encode_texts(["red circle"], ensemble=True)
    mean = _model_texts(encoder.embedder, [t.format("red circle") for t in PHOTO_TEMPLATES]).mean(0)
    assert np.allclose(ens[0], mean / np.linalg.norm(mean), atol=1e-5)
    assert np.allclose(np.linalg.norm(ens, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(plain, ens, atol=1e-3)
    both = encoder.encode_texts(["red circle", "blue square"], ensemble=True)  # texts do not mix
    assert np.allclose(both[0], ens[0], atol=1e-5)


def test_grouped_cpu_path_equals_one_call(model_dir):
    encoder = QueryEncoder(load_embedder(model_dir))
    encoder.text_call_min_rows = 0  # a group per distinct length
    lengths = (encoder.embedder.tokenize(TEXTS) != PAD_ID).sum(-1).tolist()
    assert len(split_by_length(lengths, 0)) > 1  # the test does split
    with torch.inference_mode():
        one_call = encoder.embedder.encode_text(TEXTS).float().numpy()
    assert np.allclose(encoder.encode_texts(TEXTS), one_call / np.linalg.norm(one_call, axis=1, keepdims=True),
                       atol=1e-5)  # fmt: skip


def test_a_pil_image_and_its_png_file_give_the_same_vector(encoder, tmp_path):
    img = random_image(40, seed=3)
    img.save(tmp_path / "a.png")
    z = encoder.encode_images([img, tmp_path / "a.png", str(tmp_path / "a.png")])
    assert z.shape == (3, encoder.embed_dim) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert float(z[0] @ z[1]) >= 0.9999 and float(z[1] @ z[2]) >= 0.9999


def test_the_index_queries_through_the_encoder(model_dir, tmp_path):
    photos = tmp_path / "photos"
    for i in range(3):
        photo(photos / f"p{i}.png", seed=i)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
        enc = ix.query_encoder
        assert enc.embedder is ix.model
        for ensemble in (False, True):
            assert np.array_equal(ix.embed_text("red circle", ensemble), enc.encode_texts(["red circle"], ensemble)[0])
        assert np.array_equal(ix.embed_image(photos / "p1.png"), enc.encode_images([photos / "p1.png"])[0])
        # indexing stored what a query by the same file gives
        (hit,) = ix.search(image=photos / "p1.png", k=1)
        assert hit.path.endswith("p1.png") and hit.score > 0.9999


def test_bind_model_checks_the_index_model(model_dir, tmp_path):
    photos = tmp_path / "photos"
    photo(photos / "p.png")
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        ix.update([photos], progress=False)
    model = load_embedder(model_dir)
    with Index.open(tmp_path / "db") as ix:
        ix.bind_model(model)
        assert ix.model is model and ix.query_encoder.embedder is model
    other = load_embedder(tiny_clip(tmp_path / "other", seed=1))
    with Index.open(tmp_path / "db") as ix, pytest.raises(ValueError, match="never mixes models"):
        ix.bind_model(other)
