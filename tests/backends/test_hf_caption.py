"""BLIP through mmfusion's Captioner: the same tokens as transformers, every decoding mode, and the CLI."""

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion.backends.hf_caption import HFCaptioner
from mmfusion.cli.main import main
from mmfusion.interfaces import Captioner
from tests.utils import photo

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # [DEC] starts captions, as in BLIP
WORDS = ["a", "an", "the", "photo", "picture", "of", "cat", "dog", "red", "blue", "green", "on", "in", "with",
         "sitting", "table", "man", "woman", "car", "tree", "sky"]  # fmt: skip
PROMPT = "A photo of"  # BLIP's tokenizer is lower-case; captions must give the prompt back as written


def _tokenizer(tmp_path):
    vocab = SPECIALS + WORDS
    if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters:  # transformers 5
        return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), bos_token="[DEC]")


def tiny_blip(path):
    """A tiny random BLIP captioner and its processor, written by save_pretrained."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import BlipImageProcessor as ImageProcessor

    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path.parent)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    # a larger initialiser than BLIP's (its vision default is 1e-10) so that different images get different captions
    init = 0.2
    text = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, initializer_range=init,
                bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"],
                pad_token_id=ids["[PAD]"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=init)  # fmt: skip
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32,
                        initializer_range=init)  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    # captions of words: no special token but the end one, and that one rarely (with seed 0, greedy decoding
    # of _images() ends one caption after 9 tokens and runs the others past 12)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias[[ids[t] for t in SPECIALS]] = -10.0
        bias[ids["[SEP]"]] = -0.75
    model.save_pretrained(path)
    ip = ImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return tiny_blip(tmp_path_factory.mktemp("blip") / "model")


@pytest.fixture(scope="module")
def cap(blip_dir):
    return mmfusion.load(blip_dir, device="cpu")


@pytest.fixture(scope="module")
def direct(blip_dir):
    """What a user calling transformers directly gets."""
    model = transformers.BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    return model, transformers.BlipProcessor.from_pretrained(blip_dir)


def _images(n=6):
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (64, 32), (33, 33), (80, 120), (50, 41), (32, 32)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 6], 3), dtype=np.uint8)) for i in range(n)]


def _padded(rows, pad):
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)


def _reference(direct, images, prompt=None, **kw):
    model, proc = direct
    inputs = proc(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        return model.generate(**inputs, **kw)


def test_names_load_the_adapter(blip_dir):
    for spec in (str(blip_dir), f"hf:{blip_dir}"):
        cap = mmfusion.load(spec, device="cpu")
        assert isinstance(cap, HFCaptioner) and isinstance(cap, Captioner)
        assert cap.name == f"hf:{blip_dir}" and cap.batch_size == 16 and cap.dtype == torch.float32


def test_greedy_is_transformers_greedy(cap, direct):
    images = _images()
    ref = _reference(direct, images, max_new_tokens=12)
    ids = cap.generate_ids(images, max_new_tokens=12)
    assert torch.equal(_padded(ids, cap.pad_token_id), ref)
    assert any(len(r) < ref.shape[1] for r in ids), "some caption should end early (tests the trimming)"
    texts = direct[1].batch_decode(ref, skip_special_tokens=True)
    assert cap.caption(images, max_new_tokens=12) == [t.strip() for t in texts]
    assert len(set(texts)) > 1 and all(t.strip() for t in texts)


def test_batches_paths_and_single_images(cap, tmp_path):
    images = _images()
    whole = cap.caption(images, max_new_tokens=8)
    cap.batch_size = 4
    try:
        assert cap.caption(images, max_new_tokens=8) == whole  # 4 + 2: same captions, same order
    finally:
        cap.batch_size = 16
    path = tmp_path / "one.png"
    images[2].save(path)
    assert cap.caption(path, max_new_tokens=8) == cap.caption(str(path), max_new_tokens=8) == [whole[2]]
    assert cap.caption(images[2], max_new_tokens=8) == [whole[2]]


def test_half_precision_weights_get_pixels_of_their_dtype(blip_dir):
    half = mmfusion.load(blip_dir, device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16
    out = half.caption(_images(2), max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(c, str) for c in out)


def test_beam_search_is_transformers_beam_search(cap, direct):
    images = _images(4)
    ref = _reference(direct, images, max_new_tokens=10, num_beams=3)
    ids = cap.generate_ids(images, max_new_tokens=10, num_beams=3)
    assert torch.equal(_padded(ids, cap.pad_token_id), ref)
    assert cap.caption(images, max_new_tokens=10, num_beams=3) != cap.caption(images, max_new_tokens=10)


def test_sampling_repeats_with_a_seed_and_leaves_the_global_rng_alone(cap):
    images = _images()
    kw = dict(do_sample=True, max_new_tokens=16, temperature=1.5, top_p=0.95)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = cap.caption(images, seed=1, **kw)
    after = torch.rand(3)
    assert torch.equal(before, after), "a seeded call must not move the caller's random stream"
    assert cap.caption(images, seed=1, **kw) == a
    assert cap.caption(images, seed=2, **kw) != a
    assert cap.caption(images, seed=1, **kw) == a
    assert cap.caption(images, max_new_tokens=16) != a  # greedy is not what sampling gave


def test_repetition_penalty_matches_transformers(cap, direct):
    images = _images(3)
    ref = _reference(direct, images, max_new_tokens=10, repetition_penalty=2.0)
    ids = cap.generate_ids(images, max_new_tokens=10, repetition_penalty=2.0)
    assert torch.equal(_padded(ids, cap.pad_token_id), ref)


def test_conditional_captions_start_with_the_prompt(cap, direct):
    images = _images(4)
    out = cap.caption(images, prompt=PROMPT, max_new_tokens=8)
    assert all(c.startswith(PROMPT + " ") for c in out)
    ref = _reference(direct, images, prompt=PROMPT, max_new_tokens=8)
    ids = cap.generate_ids(images, prompt=PROMPT, max_new_tokens=8)
    assert torch.equal(_padded(ids, cap.pad_token_id), ref)
    assert [c.lower() for c in out] == [t.strip() for t in direct[1].batch_decode(ref, skip_special_tokens=True)]
    assert cap.caption(images, prompt="  ", max_new_tokens=8) == cap.caption(images, max_new_tokens=8)


def test_bad_options_say_what_is_allowed(cap):
    img = _images(1)
    with pytest.raises(TypeError, match=r"unknown generation option 'beams'.*num_beams"):
        cap.caption(img, beams=3)
    with pytest.raises(TypeError, match="num_beams must be an integer"):
        cap.caption(img, num_beams="3")
    with pytest.raises(TypeError, match="seed must be an integer from"):
        cap.caption(img, do_sample=True, seed=1.5)
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        cap.caption(img, num_beams=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        cap.caption(img, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="no images"):
        cap.caption([])


def test_refuses_blip_checkpoints_that_do_not_caption(blip_dir, tmp_path):
    other = tmp_path / "vqa"
    shutil.copytree(blip_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["BlipForQuestionAnswering"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="BlipForQuestionAnswering checkpoint; captioning needs"):
        mmfusion.load(other, device="cpu")


def test_cli_captions_readable_images_and_names_broken_ones(blip_dir, cap, tmp_path, capsys):
    good = [str(photo(tmp_path / f"{i}.jpg", seed=i)) for i in range(2)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    argv = ["caption", good[0], str(broken), good[1], "--model", str(blip_dir), "--device", "cpu"]
    assert main([*argv, "--json", "--max-new-tokens", "6"]) == 1
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert [r["image"] for r in res] == good and all(r["caption"] for r in res)
    assert str(broken) in err and "skipped" in err
    assert [r["caption"] for r in res] == cap.caption(good, max_new_tokens=6)

    assert main([*argv[:2], *argv[3:], "--prompt", PROMPT, "--beams", "2", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == good and all(ln.split("\t")[1].startswith(PROMPT) for ln in lines)

    seeded = [*argv[:2], "--model", str(blip_dir), "--sample", "--seed", "3", "--temperature", "1.5", "--json"]
    assert main(seeded) == 0
    first = capsys.readouterr().out
    assert main(seeded) == 0 and capsys.readouterr().out == first


def test_cli_refuses_flags_and_models_that_do_not_fit(blip_dir, tmp_path, capsys):
    from tests.backends.tiny_hf import tiny_clip

    img = str(photo(tmp_path / "a.jpg"))
    assert main(["caption", img, "--model", str(blip_dir), "--temperature", "0.5"]) == 2
    assert "add --sample" in capsys.readouterr().err
    assert main(["caption", img, "--model", str(blip_dir), "--beams", "0"]) == 2
    assert "num_beams must be at least 1" in capsys.readouterr().err
    clip = tiny_clip(tmp_path / "clip")
    assert main(["caption", img, "--model", f"hf:{clip}"]) == 2
    err = capsys.readouterr().err
    assert f"hf:{clip} is a CLIP model (an Embedder); caption needs a BLIP" in err
