"""The ONNX Runtime embedder against the torch model it was exported from: the same preprocessing, the same token
ids, the same embeddings, and no torch needed to run it."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion.backends.ort import EXPORT_FILE, IMAGE_FILE, TEXT_FILE, OrtEmbedder, Preprocess, TextTokenizer
from mmfusion.data import tokenizer as native_tok
from mmfusion.data.images import ImageTransform
from mmfusion.data.shapes import ShapesWorld
from tests.export.helpers import BLOCKED, NO_TORCH, cosines


def images_and_texts(n: int = 64) -> tuple[list[Image.Image], list[str]]:
    world = ShapesWorld()
    samples = [world.sample("test", i) for i in range(n)]
    rng = np.random.default_rng(0)
    images = [s.image for s in samples[: n // 2]]
    images += [Image.fromarray(rng.integers(0, 255, (40 + i, 90 - i, 3), dtype=np.uint8)) for i in range(n // 2)]
    texts = [s.captions[0].text for s in samples[: n - 4]]
    texts += ["", "A RED Circle!", "ünïcödé ✓ shapes", " ".join(["a big red circle left of a blue square"] * 8)]
    return images, texts


def test_ort_embedder_equals_the_torch_model(clip_tiny):
    ckpt, export = clip_tiny
    model, ort = mmfusion.load(ckpt), mmfusion.load(export)
    assert isinstance(ort, OrtEmbedder) and isinstance(ort, mmfusion.interfaces.Embedder)
    assert ort.embed_dim == model.embed_dim and ort.fingerprint == mmfusion.index.model_fingerprint(model)
    images, texts = images_and_texts(64)
    with torch.inference_mode():
        ti, tt = model.encode_image(images), model.encode_text(texts)
        ti_raw = model.encode_image(images, normalize=False)
    oi, ot = ort.encode_image(images), ort.encode_text(texts)
    assert isinstance(oi, torch.Tensor) and oi.shape == ti.shape and ot.shape == tt.shape  # torch is loaded here
    assert cosines(ti, oi).min() >= 0.9999 and cosines(tt, ot).min() >= 0.9999
    np.testing.assert_allclose(ort.encode_image(images, normalize=False).numpy(), ti_raw.numpy(), rtol=1e-3,
                               atol=1e-4)  # fmt: skip
    # preprocessed pixels and token ids go in as they do for the native model, NumPy or torch
    pixels = model.transform(images[:4])
    assert cosines(ort.encode_image(pixels), ti[:4]).min() >= 0.9999
    assert cosines(ort.encode_image(pixels.numpy()), ti[:4]).min() >= 0.9999
    ids = model.tokenize(texts[:5])
    assert cosines(ort.encode_text(ids), tt[:5]).min() >= 0.9999
    assert ort.encode_image([]).shape == (0, model.embed_dim) and ort.encode_text([]).shape == (0, model.embed_dim)


def test_the_text_graph_takes_any_length_and_texts_without_eot(tiny):
    ckpt, export = tiny
    model, ort = mmfusion.load(ckpt), mmfusion.load(export)
    gen = torch.Generator().manual_seed(0)
    for length in (1, 3, 11, model.cfg.text.context_length):
        ids = torch.randint(4, 500, (5, length), generator=gen)  # no <eot>: pooled at the last position
        ids[1, length // 2] = native_tok.EOT_ID
        with torch.inference_mode():
            want = model.encode_text(ids)
        assert cosines(ort.encode_text(ids.numpy()), want).min() >= 0.9999, length


def test_tokenizer_gives_the_native_ids(clip_tiny):
    ckpt, export = clip_tiny
    native = mmfusion.load(ckpt).tokenizer
    mine = TextTokenizer(export / "tokenizer.json", native.context_length)
    _, texts = images_and_texts(64)
    texts += ["   padded   ", "tabs\tand\nnewlines", "😀 emoji", "a" * 500]
    np.testing.assert_array_equal(mine.encode(texts), native.encode(texts).numpy())
    assert mine.encode(texts).dtype == np.int64
    from mmfusion.backends import ort

    assert (ort.PAD_ID, ort.SOT_ID, ort.EOT_ID) == (native_tok.PAD_ID, native_tok.SOT_ID, native_tok.EOT_ID)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "CMYK", "I;16", "1"])
def test_preprocessing_gives_the_native_pixels(mode):
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (37, 83, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (50, 30), dtype=np.uint16))
    elif mode == "P":
        img = base.convert("P")
        img.info["transparency"] = 3
    else:
        img = base.convert(mode)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    want = ImageTransform(24, mean, std)([img]).numpy()
    got = Preprocess(24, mean, std)([img])
    np.testing.assert_array_equal(got, want)


def test_index_zero_shot_and_eval_accept_the_ort_embedder(clip_tiny, tmp_path):
    """An index built with the torch model opens with its fp32 export (the same fingerprint) and ranks alike;
    zero-shot labels and the retrieval evaluation take it as they take the native model."""
    from mmfusion.eval.report import evaluate_retrieval
    from mmfusion.index import Index
    from mmfusion.tasks import ZeroShotClassifier

    ckpt, export = clip_tiny
    model, ort = mmfusion.load(ckpt), mmfusion.load(export)
    world = ShapesWorld()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        world.sample("test", i).image.save(photos / f"s{i:02d}.png")
    with Index.open(tmp_path / "db", model=model, write=True) as ix:
        ix.update([photos], progress=False)
    with Index.open(tmp_path / "db", model=ort) as ix:
        got = [r.id for r in ix.search(text="a red circle", k=5)]
        by_image = [r.id for r in ix.search(image=photos / "s03.png", k=3)]
    with Index.open(tmp_path / "db", model=model) as ix:
        assert got == [r.id for r in ix.search(text="a red circle", k=5)]
        assert by_image == [r.id for r in ix.search(image=photos / "s03.png", k=3)]
    labels = ["red circle", "blue square", "green triangle"]
    images = [world.sample("test", i).image for i in range(6)]
    want = ZeroShotClassifier(model, labels, cache_dir=None).classify(images, k=3)
    have = ZeroShotClassifier(ort, labels, cache_dir=None).classify(images, k=3)
    for w, h in zip(want, have, strict=True):
        assert [p.label for p in w] == [p.label for p in h]
        np.testing.assert_allclose([p.score for p in w], [p.score for p in h], atol=1e-3)
    r_model = evaluate_retrieval(model, "shapes", n=40, progress=False)["metrics"]
    r_ort = evaluate_retrieval(ort, "shapes", n=40, progress=False)["metrics"]
    assert abs(r_model["t2i_R@10"] - r_ort["t2i_R@10"]) <= 0.01


def test_an_export_loads_and_embeds_with_torch_blocked(clip_tiny, tmp_path):
    ckpt, export = clip_tiny
    images, texts = images_and_texts(16)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    args = [str(export), json.dumps(paths), json.dumps(texts), str(tmp_path / "i.npy"), str(tmp_path / "t.npy")]
    done = subprocess.run([sys.executable, "-c", BLOCKED, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ok OrtEmbedder" in done.stdout
    model = mmfusion.load(ckpt)
    with torch.inference_mode():
        ti = model.encode_image([Image.open(p) for p in paths])
        tt = model.encode_text(texts)
    assert cosines(np.load(tmp_path / "i.npy"), ti).min() >= 0.9999
    assert cosines(np.load(tmp_path / "t.npy"), tt).min() >= 0.9999


def test_the_blocker_can_fail(tmp_path):
    """Negative control: the same blocker stops a script that needs torch (the native checkpoint loader)."""
    script = BLOCKED.split("model = mmfusion.load")[0] + "mmfusion.create_model('clip-tiny')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "torch is blocked" in done.stderr


def test_bad_export_dirs_say_what_to_run(tiny, tmp_path):
    ckpt, export = tiny
    with pytest.raises(FileNotFoundError, match="mmfusion export onnx"):
        OrtEmbedder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not an ONNX export.*mmfusion export onnx --model"):
        OrtEmbedder(ckpt)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / EXPORT_FILE).write_text((export / EXPORT_FILE).read_text())
    (broken / TEXT_FILE).write_bytes((export / TEXT_FILE).read_bytes())
    with pytest.raises(FileNotFoundError, match=f"lacks {IMAGE_FILE}: export the model again"):
        mmfusion.load(broken)
    cfg = json.loads((export / EXPORT_FILE).read_text())
    (broken / EXPORT_FILE).write_text(json.dumps({**cfg, "format": "mmfusion.onnx/99"}))
    with pytest.raises(FileNotFoundError, match="export the model again"):
        mmfusion.load(broken)
    ort = mmfusion.load(export)
    with pytest.raises(ValueError, match=r"expected pixels of shape \(B, 3, 16, 16\)"):
        ort.encode_image(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="cpu or cuda"):
        mmfusion.load(export, device="mps")
    with pytest.raises(ValueError, match="quantize do not apply to an ONNX export.*mmfusion quantize"):
        mmfusion.load(export, quantize="int8")


def test_the_service_serves_embeddings_from_an_export(clip_tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmfusion.serve.app import create_app
    from mmfusion.serve.settings import ServeSettings
    from mmfusion.tasks import ZeroShotClassifier
    from tests.serve.conftest import LOCAL

    ckpt, export = clip_tiny
    texts = ["a red circle", "two green squares"]
    with TestClient(create_app(ServeSettings(model=str(export))), base_url=LOCAL) as client:
        r = client.post("/v1/embeddings", json={"input": texts})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        buf = io.BytesIO()
        image = ShapesWorld().sample("test", 0).image
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        labels = ["red circle", "blue square", "green triangle"]
        r = client.post("/classify", json={"image": url, "labels": labels, "k": 3})
        assert r.status_code == 200, r.text
        served = [(x["label"], x["score"]) for x in r.json()["labels"]]
    model = mmfusion.load(ckpt)
    with torch.inference_mode():
        want = model.encode_text(texts).numpy()
    assert cosines(got, want).min() >= 0.9999
    local = ZeroShotClassifier(model, labels, cache_dir=None).classify([image], k=3)[0]
    assert [lab for lab, _ in served] == [p.label for p in local]
    np.testing.assert_allclose([s for _, s in served], [p.score for p in local], atol=1e-3)


def test_numpy_output_and_single_arrays(tiny):
    _, export = tiny
    ort = mmfusion.load(export, output="numpy")
    arr = np.asarray(ShapesWorld().sample("test", 1).image)
    one, listed = ort.encode_image(arr), ort.encode_image([Image.fromarray(arr)])
    assert isinstance(one, np.ndarray) and one.shape == (1, 16)
    np.testing.assert_allclose(one, listed, atol=1e-6)
    assert isinstance(ort.encode_text("a red circle"), np.ndarray)
    assert ort.probabilities(one, ort.encode_text(["a", "b"])).sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="output must be"):
        mmfusion.load(export, output="jax")


def test_an_export_travels_to_other_processes_as_its_directory(tiny):
    """Pickled (for a Ray actor, say) as the directory and its options: the copy embeds the same."""
    import pickle

    _, export = tiny
    ort = mmfusion.load(export, output="numpy", threads=1)
    copy = pickle.loads(pickle.dumps(ort))
    assert type(copy) is type(ort) and copy.fingerprint == ort.fingerprint and copy.output == "numpy"
    np.testing.assert_array_equal(copy.encode_text(["a red circle"]), ort.encode_text(["a red circle"]))


SERVE_BLOCKED = (
    NO_TORCH
    + """
from mmfusion.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
)


def test_the_service_serves_an_export_with_torch_blocked(tiny, tmp_path):
    """`mmfusion serve --model EXPORT --db DB` in a process where torch cannot be imported: embeddings (texts and
    images) and search answer; the slim deployment's path."""
    import socket
    import time

    import httpx

    from mmfusion.index import Index
    from tests.utils import photo

    _, export = tiny
    for i in range(6):
        photo(tmp_path / "photos" / f"p{i}.png", (40, 30), seed=i)
    with Index.open(tmp_path / "db", model=export, write=True) as ix:
        ix.update([tmp_path / "photos"], progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", "--model", str(export), "--db", str(tmp_path / "db"), "--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-c", SERVE_BLOCKED, *argv], stderr=subprocess.PIPE, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 60 s"
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"{base}/v1/embeddings", json={"input": ["a red circle", "a blue square"]}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2 and len(r.json()["data"][0]["embedding"]) == 16
        png = base64.b64encode((tmp_path / "photos" / "p0.png").read_bytes()).decode()
        r = httpx.post(f"{base}/v1/embeddings", json={"input": [f"data:image/png;base64,{png}"], "modality": "image"},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        r = httpx.post(f"{base}/search", json={"text": "a red circle", "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
        labels = ["red circle", "blue square", "green triangle"]
        r = httpx.post(f"{base}/classify", json={"image": f"data:image/png;base64,{png}", "labels": labels, "k": 3},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        served = r.json()["labels"]
        r = httpx.post(f"{base}/classify", json={"image": f"data:image/png;base64,{png}", "labels": labels,
                                                 "threshold": -1.0}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["score"] == "cosine" and len(r.json()["labels"]) == 3, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from mmfusion.tasks import ZeroShotClassifier  # the same labels and scores as the torch-side classifier

    local = ZeroShotClassifier(mmfusion.load(export), labels, cache_dir=None).classify(
        [tmp_path / "photos" / "p0.png"], k=3
    )
    assert [x["label"] for x in served] == [p.label for p in local[0]]
    np.testing.assert_allclose([x["score"] for x in served], [p.score for p in local[0]], atol=1e-4)


def test_the_service_threads_setting_reaches_onnx_runtime(tiny):
    """`threads` sets the export's intra-op threads (and torch's), and closing the service puts the old back."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmfusion.backends import ort
    from mmfusion.serve.app import create_app
    from mmfusion.serve.settings import ServeSettings
    from tests.serve.conftest import LOCAL

    _, export = tiny
    torch_before = torch.get_num_threads()
    with TestClient(create_app(ServeSettings(model=str(export), threads=1)), base_url=LOCAL) as client:
        svc = client.app.state.service
        for session in (svc.embedder.image_session, svc.embedder.text_session):
            assert session.get_session_options().intra_op_num_threads == 1
        assert torch.get_num_threads() == 1
        assert client.post("/v1/embeddings", json={"input": ["a red circle"]}).status_code == 200
    assert ort.DEFAULT_THREADS is None and torch.get_num_threads() == torch_before
