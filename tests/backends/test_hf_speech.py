"""Whisper through mmfusion's Transcriber: the same tokens as transformers, long-form audio, languages,
resampling, and the ``mmfusion transcribe`` command.

The model is a tiny random Whisper built here (nothing is downloaded), so its words are garbage: the tests
check structure and agreement with transformers, not what is said.
"""

import copy
import inspect
import json

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
transformers = pytest.importorskip("transformers")

import mmfusion  # noqa: E402
from mmfusion.backends.hf_speech import HFTranscriber  # noqa: E402
from mmfusion.cli.main import main  # noqa: E402
from mmfusion.data.audio import AudioDecodeError, load_audio, resample  # noqa: E402
from mmfusion.interfaces import Segment, Transcriber, Transcript  # noqa: E402
from mmfusion.tasks.subtitles import to_srt, to_vtt  # noqa: E402

LANGUAGES = ["en", "de", "fr"]
TOKENS = 24  # max_new_tokens per window: bounds the time a random model spends
SR = 16000


def whisper_tokenizer(path):
    """A byte-level BPE tokenizer with Whisper's special tokens and its 1501 timestamp tokens."""
    from tokenizers import AddedToken, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    specials = ["<|startoftranscript|>", *[f"<|{code}|>" for code in LANGUAGES], "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]  # fmt: skip
    if "vocab" in inspect.signature(transformers.WhisperTokenizer.__init__).parameters:  # transformers 5
        tok = transformers.WhisperTokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials)
    else:  # transformers 4: from vocab.json and merges.txt
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        files = {"vocab_file": str(path / "vocab.json"), "merges_file": str(path / "merges.txt")}
        tok = transformers.WhisperTokenizerFast(**files, additional_special_tokens=specials)
    times = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tok.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in times])
    return tok


def tiny_whisper(path, seed: int = 0):
    """A tiny random multilingual Whisper, its processor and generation config, written by save_pretrained."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperProcessor

    tok = whisper_tokenizer(path)
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    cfg = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=448,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=True, max_initial_timestamp_index=50,
        suppress_tokens=[ids("<|startoflm|>")], begin_suppress_tokens=[ids("Ġ"), eot],
    )  # fmt: skip
    model.save_pretrained(path)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(path)
    return path


def noise(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Band-limited noise with a slow envelope: something for the encoder to chew on."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = rng.standard_normal(n) * (0.3 + 0.2 * np.sin(np.arange(n) / sr * 2 * np.pi * 0.5))
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def asr(model_dir) -> HFTranscriber:
    return mmfusion.load(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers on its own: the model and processor, loaded directly."""
    model = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    return model, transformers.WhisperProcessor.from_pretrained(model_dir)


def direct_generate(reference, x: np.ndarray, **kwargs):
    """transformers' documented recipe: whole-audio features (30 s padding only for short audio), generate."""
    model, processor = reference
    inputs = processor(x, sampling_rate=SR, return_tensors="pt", truncation=False, padding="longest",
                       return_attention_mask=True)  # fmt: skip
    if inputs["input_features"].shape[-1] < 3000:  # short-form: one 30-second window, padded as in training
        inputs = processor(x, sampling_rate=SR, return_tensors="pt", return_attention_mask=True)
    with torch.inference_mode():
        return model.generate(**inputs, return_segments=True, max_new_tokens=TOKENS, **kwargs)


def test_names_load_the_adapter(model_dir, asr):
    assert isinstance(asr, HFTranscriber) and isinstance(asr, Transcriber)
    assert asr.name == f"hf:{model_dir}" and asr.languages == sorted(LANGUAGES)
    assert asr.sampling_rate == SR and asr.window_frames == 3000
    again = mmfusion.load("hf:" + str(model_dir), device="cpu")
    assert isinstance(again, HFTranscriber) and again.name == f"hf:{model_dir}"


@pytest.mark.parametrize("seconds", [7.0, 45.0])
def test_tokens_equal_transformers(asr, reference, seconds):
    x = noise(seconds)
    ours = asr.generate(x, SR, max_new_tokens=TOKENS)
    theirs = direct_generate(reference, x, return_timestamps=True, task="transcribe")
    assert torch.equal(ours.sequences, theirs["sequences"][0])
    assert len(ours.segments) == len(theirs["segments"][0])
    for a, b in zip(ours.segments, theirs["segments"][0]):
        assert torch.equal(a["tokens"], b["tokens"]) and a["start"] == pytest.approx(float(b["start"]))
    # the transcript is the tokens of the segments inside the audio, decoded without special tokens
    kept = [s["tokens"] for s in theirs["segments"][0] if float(s["start"]) < seconds]
    tokenizer = reference[1].tokenizer
    expected = tokenizer.decode(torch.cat(kept), skip_special_tokens=True).strip() if kept else ""
    t = asr.transcribe(x, SR, max_new_tokens=TOKENS)
    assert t.text == expected and "<|" not in t.text
    assert t.language == ours.language


def test_long_audio_goes_window_by_window(asr):
    x = noise(45.0, seed=1)
    assert asr.features(x)["input_features"].shape[-1] == 4500  # the whole audio, not cut at 30 s
    out = asr.generate(x, SR, max_new_tokens=TOKENS)
    assert out.duration == pytest.approx(45.0)
    assert max(s["start"] for s in out.segments) >= 30.0  # a second window was decoded
    t = asr.to_transcript(out)
    assert t.segments, "the random model produced no segment; pick another seed"
    prev_end = 0.0
    for s in t.segments:
        assert prev_end <= s.start <= s.end <= 45.0
        assert s.text and s.text == s.text.strip()
        prev_end = s.end


def test_segments_past_the_end_are_dropped_and_times_clipped(asr):
    tokens = torch.tensor(asr.tokenizer.encode(" the hat", add_special_tokens=False))
    out = type(asr.generate(noise(1.0), SR, max_new_tokens=4))(
        sequences=torch.cat([tokens] * 4),
        segments=[{"start": -0.02, "end": 2.0, "tokens": tokens}, {"start": 1.5, "end": 9.0, "tokens": tokens},
                  {"start": 4.0, "end": 3.0, "tokens": tokens}, {"start": 6.0, "end": 7.0, "tokens": tokens}],
        language="en", duration=5.0, timestamps=True,
    )  # fmt: skip
    t = asr.to_transcript(out)
    assert [(s.start, s.end) for s in t.segments] == [(0.0, 2.0), (2.0, 5.0)]
    assert t.text == "the hat the hat" and [s.text for s in t.segments] == ["the hat", "the hat"]
    out.timestamps = False
    assert [(s.start, s.end) for s in asr.to_transcript(out).segments] == [(0.0, 5.0)]


def test_language_given_or_detected(asr, reference):
    x = noise(5.0, seed=2)
    features = asr.features(x)["input_features"]
    detected = reference[0].detect_language(features)[0].item()
    code = reference[1].tokenizer.convert_ids_to_tokens(detected)[2:-2]
    assert asr.transcribe(x, SR, max_new_tokens=TOKENS).language == code

    ours = asr.generate(x, SR, language="de", max_new_tokens=TOKENS)
    theirs = direct_generate(reference, x, return_timestamps=True, language="de", task="transcribe")
    assert ours.language == "de" and torch.equal(ours.sequences, theirs["sequences"][0])
    assert asr.transcribe(x, SR, language="German", max_new_tokens=4).language == "de"
    assert asr.transcribe(x, SR, language="<|fr|>", task="translate", max_new_tokens=4).language == "fr"
    with pytest.raises(ValueError, match="knows: de, en, fr"):
        asr.transcribe(x, SR, language="ja")
    with pytest.raises(ValueError, match="task"):
        asr.transcribe(x, SR, task="summarize")


def test_english_only_model(asr):
    model = copy.deepcopy(asr.model)
    model.generation_config.is_multilingual = False  # as in openai/whisper-*.en
    english = HFTranscriber(model, asr.processor, "hf:tiny.en", asr.device)
    assert english.languages == []
    x = noise(3.0)
    assert english.transcribe(x, SR, max_new_tokens=4).language == "en"
    assert english.transcribe(x, SR, language="english", max_new_tokens=4).language == "en"
    with pytest.raises(ValueError, match="English-only"):
        english.transcribe(x, SR, language="de")
    with pytest.raises(ValueError, match="cannot translate"):
        english.transcribe(x, SR, task="translate")


def test_without_timestamps(asr, reference):
    x = noise(6.0, seed=3)
    ours = asr.generate(x, SR, language="en", timestamps=False, max_new_tokens=TOKENS)
    theirs = direct_generate(reference, x, return_timestamps=False, language="en", task="transcribe")
    assert torch.equal(ours.sequences, theirs["sequences"][0])
    t = asr.to_transcript(ours)
    assert t.segments == ([Segment(0.0, 6.0, t.text)] if t.text else [])
    long = asr.transcribe(noise(45.0, seed=1), SR, timestamps=False, max_new_tokens=TOKENS)
    assert [(s.start, s.end) for s in long.segments] == [(0.0, 45.0)]


def test_arrays_are_resampled_and_files_read(asr, tmp_path):
    x8 = resample(noise(4.0, seed=4), SR, 8000)
    t8 = asr.transcribe(x8, sampling_rate=8000, max_new_tokens=TOKENS)
    t16 = asr.transcribe(resample(x8, 8000, SR), sampling_rate=SR, max_new_tokens=TOKENS)
    assert t8 == t16
    assert torch.equal(
        asr.generate(x8, 8000, max_new_tokens=TOKENS).sequences,
        asr.generate(resample(x8, 8000, SR), SR, max_new_tokens=TOKENS).sequences,
    )
    pcm = (x8 * 32767).astype(np.int16)  # integer PCM is scaled like a file's
    assert asr.waveform(pcm, 8000) == pytest.approx(asr.waveform(pcm.astype(np.float32) / 32768, 8000), abs=1e-6)
    path = tmp_path / "speech.flac"
    sf.write(path, x8, 8000, subtype="PCM_24")
    assert asr.transcribe(path, max_new_tokens=TOKENS) == asr.transcribe(
        load_audio(path, SR), sampling_rate=SR, max_new_tokens=TOKENS
    )
    assert asr.transcribe(torch.from_numpy(x8), sampling_rate=8000, max_new_tokens=TOKENS) == t8

    with pytest.raises(ValueError, match="sampling_rate"):
        asr.transcribe(x8)
    with pytest.raises(ValueError, match="1-D"):
        asr.transcribe(np.stack([x8, x8], axis=1), sampling_rate=8000)
    with pytest.raises(ValueError, match="own rate"):
        asr.transcribe(path, sampling_rate=8000)
    with pytest.raises(AudioDecodeError, match="missing.wav"):
        asr.transcribe(tmp_path / "missing.wav")


def test_options_are_checked(asr):
    x = noise(2.0)
    with pytest.raises(TypeError, match="unknown generation option 'beam_size'"):
        asr.transcribe(x, SR, beam_size=5)
    with pytest.raises(TypeError, match="num_beams must be an integer"):
        asr.transcribe(x, SR, num_beams=2.5)
    with pytest.raises(ValueError, match="max_new_tokens can be at most 444"):
        asr.transcribe(x, SR, max_new_tokens=1000)
    a = asr.transcribe(x, SR, do_sample=True, temperature=0.9, seed=3, max_new_tokens=8)
    assert a == asr.transcribe(x, SR, do_sample=True, temperature=0.9, seed=3, max_new_tokens=8)
    assert asr.generate(x, SR, num_beams=2, max_new_tokens=8).sequences.dtype == torch.long


def test_subtitle_formats():
    t = Transcript("Hello there. General Kenobi!", [Segment(0.0, 1.5, "Hello there."),
                   Segment(61.25, 3725.0049, "General --> Kenobi!")], "en")  # fmt: skip
    srt = ["1", "00:00:00,000 --> 00:00:01,500", "Hello there.", "",
           "2", "00:01:01,250 --> 01:02:05,005", "General --> Kenobi!", ""]  # fmt: skip
    assert to_srt(t) == "\n".join(srt)
    vtt = ["WEBVTT", "", "00:00:00.000 --> 00:00:01.500", "Hello there.", "",
           "00:01:01.250 --> 01:02:05.005", "General -> Kenobi!", ""]  # fmt: skip
    assert to_vtt(t) == "\n".join(vtt)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    sf.write(d / "good.wav", noise(3.0, seed=5), SR, subtype="PCM_16")
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    return d


def test_cli_json_reports_a_bad_file_and_goes_on(model_dir, audio_files, capsys):
    good, bad = str(audio_files / "good.wav"), str(audio_files / "broken.wav")
    rc = main(["transcribe", bad, good, "--model", str(model_dir), "--device", "cpu", "--format", "json",
               "--max-new-tokens", str(TOKENS)])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["path"] == good and record["language"] in LANGUAGES
    assert isinstance(record["text"], str)
    for s in record["segments"]:
        assert 0.0 <= s["start"] <= s["end"] <= 3.0
    assert "broken.wav" in err and "ffmpeg" in err and "1 of 2 audio files" in err


def test_cli_subtitles(model_dir, audio_files, tmp_path, capsys):
    good = str(audio_files / "good.wav")
    expected = mmfusion.load(str(model_dir), device="cpu").transcribe(good, max_new_tokens=TOKENS)
    assert expected.segments, "the random model produced no segment; pick another seed"
    args = ["transcribe", good, "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", str(TOKENS)]
    assert main([*args, "--format", "srt"]) == 0
    out = capsys.readouterr().out
    assert out == to_srt(expected) and out.startswith("1\n00:00:0") and " --> " in out

    assert main([*args, "--format", "vtt", "--out-dir", str(tmp_path / "subs")]) == 0
    assert (tmp_path / "subs" / "good.vtt").read_text() == to_vtt(expected)
    assert capsys.readouterr().out == f"{good} -> {tmp_path / 'subs' / 'good.vtt'}\n"

    assert main([*args, "--language", "klingon"]) == 2  # refused before any file is transcribed
    out, err = capsys.readouterr()
    assert out == "" and "does not know the language 'klingon'" in err

    german = mmfusion.load(str(model_dir), device="cpu").transcribe(
        good, language="de", timestamps=False, max_new_tokens=TOKENS
    )
    assert main([*args, "--no-timestamps", "--language", "de"]) == 0
    assert capsys.readouterr().out == german.text + "\n"


def test_cli_refuses_a_model_that_does_not_transcribe(audio_files, tmp_path, capsys):
    from mmfusion import create_model, save_model

    native = save_model(create_model("clip-tiny"), tmp_path / "clip")
    rc = main(["transcribe", str(audio_files / "good.wav"), "--model", str(native)])
    err = capsys.readouterr().err
    assert rc == 2 and "transcribe needs a speech-to-text model" in err and "Embedder" in err

    assert main(["transcribe", str(tmp_path / "nothing.wav"), "--model", str(native)]) == 1  # before loading
    assert "nothing.wav: file not found" in capsys.readouterr().err
