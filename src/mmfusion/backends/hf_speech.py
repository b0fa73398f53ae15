"""Speech to text with Whisper (``WhisperForConditionalGeneration``) behind :class:`~mmfusion.interfaces.Transcriber`.

Load it by name like any other model::

    asr = mmfusion.load("hf:openai/whisper-small")
    t = asr.transcribe("talk.mp3")                       # any length; the language is detected
    t.text, t.language                                   # 'Welcome to ...', 'en'
    [(s.start, s.end, s.text) for s in t.segments]       # seconds from the start of the audio
    asr.transcribe("rede.flac", language="de", task="translate")   # German speech -> English text
    asr.transcribe(samples, sampling_rate=44100, num_beams=5)      # a 1-D float array, resampled here

Audio up to 30 s is one window, padded as Whisper was trained; longer audio goes through transformers'
long-form (sequential) decoding: window after window, each one starting where the last complete segment
of the previous one ended. Segment times come from Whisper's timestamp tokens; segments the model puts
after the end of the audio (in the padding of the last window) are dropped, and times are clipped to the
audio so that they never overlap and never go backwards.

Options are the fields of :class:`~mmfusion.interfaces.GenerationOptions`; ``max_new_tokens`` (tokens per
30-second window) defaults to half the decoder's context, 224 for the released models, as in OpenAI's
implementation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.audio import load_audio, resample
from ..interfaces import GenerationOptions, Segment, Transcript
from .hf import seeded, weights_dtype
from .hf_loading import HFFamily, load_family

SPEECH_ARCHITECTURE = "WhisperForConditionalGeneration"
SPEECH_FAMILY = HFFamily("whisper", SPEECH_ARCHITECTURE, "WhisperProcessor", "transcription", "openai/whisper-small")
TASKS = ("transcribe", "translate")


@dataclass
class WhisperOutput:
    """What Whisper generated for one audio, before it becomes a :class:`~mmfusion.interfaces.Transcript`.

    Attributes:
        sequences: every generated token id in order (timestamp tokens included, the start-of-transcript
            prompt not), a 1-D ``LongTensor`` on CPU; the same as transformers' ``generate(...)["sequences"][0]``.
        segments: transformers' segments: ``start`` and ``end`` in seconds (floats, as the model put them,
            possibly past the end of the audio), ``tokens`` (a 1-D ``LongTensor`` on CPU).
        language: the spoken language's code (``"en"``), given or detected; None when the model cannot say.
        duration: seconds of audio.
        timestamps: whether segment times were asked for.
    """

    sequences: torch.Tensor
    segments: list[dict[str, Any]]
    language: str | None
    duration: float
    timestamps: bool


class HFTranscriber:
    """:class:`~mmfusion.interfaces.Transcriber` over a Whisper model (``WhisperForConditionalGeneration``).

    Attributes:
        model: the ``WhisperForConditionalGeneration``, in eval mode on ``device``.
        processor: its ``WhisperProcessor`` (log-mel feature extractor and tokenizer).
        name: ``hf:<source>``, the name the model was loaded by.
        device: where the model runs.
        sampling_rate: the rate the model hears (16000 Hz); other audio is resampled to it.
        languages: the language codes a multilingual model knows (empty for an English-only one).
    """

    def __init__(self, model, processor, name: str, device: torch.device):
        self.model, self.processor, self.name = model, processor, name
        self.model_type = "whisper"
        self.device = device
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        encoder = model.model.encoder
        stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
        self.window_frames = stride * model.config.max_source_positions  # 3000 log-mel frames: 30 s
        self.window_samples = self.window_frames * self.feature_extractor.hop_length
        self.max_target_positions = model.config.max_target_positions
        gc = model.generation_config
        self._lang_to_id: dict[str, int] = dict(getattr(gc, "lang_to_id", None) or {})
        self.english_only = getattr(gc, "is_multilingual", None) is False
        self.languages = [] if self.english_only else sorted(k.strip("<|>") for k in self._lang_to_id)

    @classmethod
    def from_pretrained(cls, source: str, *, device=None, dtype=None, quantize=None) -> HFTranscriber:
        """Load a Whisper model and its processor.

        Args:
            source: a hub id (``openai/whisper-small``, read from the Hugging Face cache when there) or a
                directory written by ``save_pretrained`` (model, generation config and processor).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: CUDA when present, else CPU.
            dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or a ``torch.dtype``; default: float32 on CPU, bfloat16
                (or float16) on a GPU.
            quantize: ``"int8"`` (dynamic, CPU), ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA), or None.

        Raises:
            ValueError: the model is not a Whisper speech-to-text model.
            ModelNotFoundError: neither a local directory nor in the cache (and downloading is not possible).
        """
        loaded = load_family(source, SPEECH_FAMILY, device=device, dtype=dtype, quantize=quantize)
        return cls(loaded.model, loaded.processor, loaded.name, loaded.device)

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the model's weights (float32 for a fully quantised model)."""
        return weights_dtype(self.model)

    # ---- the Transcriber interface -------------------------------------------------------------------

    def transcribe(
        self,
        audio: Any,
        sampling_rate: int | None = None,
        language: str | None = None,
        task: str = "transcribe",
        timestamps: bool = True,
        **options: Any,
    ) -> Transcript:
        """Turn speech into text, with the time of each segment.

        Args:
            audio: an audio file path (WAV, FLAC, OGG, MP3...; see :func:`mmfusion.data.audio.load_audio`),
                an open binary file, or a 1-D array of float samples in [-1, 1] (integer PCM is scaled).
            sampling_rate: the rate of an array, in Hz (required for arrays; resampled to 16 kHz when it
                differs). Files carry their own rate.
            language: the spoken language as a code (``"de"``) or a name (``"german"``); None detects it from
                the first 30 seconds. An English-only model (``*.en``) only takes English.
            task: ``"transcribe"`` (text in the spoken language) or ``"translate"`` (English text).
            timestamps: False asks for no timestamp tokens: one segment spans the whole audio (audio over
                30 s is still decoded with timestamps, as long-form decoding needs them).
            **options: :class:`~mmfusion.interfaces.GenerationOptions` fields: ``max_new_tokens`` (per 30 s
                window; default half the decoder's context, 224), ``num_beams`` (1), ``do_sample`` (False),
                ``temperature`` and ``top_p`` when sampling, ``repetition_penalty``, ``seed``.

        Returns:
            The :class:`~mmfusion.interfaces.Transcript`: the whole text, its segments (start and end in
            seconds, non-overlapping, within the audio) and the spoken language's code (given or detected;
            with ``task="translate"`` still the language spoken, not English).

        Raises:
            AudioDecodeError: an audio file that cannot be read (the message says why).
            ValueError: an array without ``sampling_rate`` or not 1-D, an unknown language or task, an option
                out of range.
            TypeError: an unknown option name or a wrongly typed value.
        """
        return self.to_transcript(self.generate(audio, sampling_rate, language, task, timestamps, **options))

    @torch.inference_mode()
    def generate(
        self,
        audio: Any,
        sampling_rate: int | None = None,
        language: str | None = None,
        task: str = "transcribe",
        timestamps: bool = True,
        **options: Any,
    ) -> WhisperOutput:
        """What :meth:`transcribe` decodes: the generated tokens and transformers' segments.

        The call is transformers' own long-form recipe: log-mel features of the whole audio (padded to 30 s
        when shorter, unpadded and untruncated when longer) with their attention mask, then
        ``model.generate(..., return_timestamps=True, return_segments=True, language=, task=)``. Arguments
        as for :meth:`transcribe`.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        opts = GenerationOptions.parse(options, max_new_tokens=self.max_target_positions // 2)
        if opts.max_new_tokens > self.max_target_positions - 4:  # room for the prompt: start, language, task
            raise ValueError(
                f"max_new_tokens can be at most {self.max_target_positions - 4} for {self.name} "
                f"(its decoder holds {self.max_target_positions} tokens), got {opts.max_new_tokens}"
            )
        samples = self.waveform(audio, sampling_rate)
        inputs = self.features(samples)
        features = inputs["input_features"].to(self.device, self.dtype)
        long_form = features.shape[-1] > self.window_frames
        lang_kwargs, code = self._language_and_task(features, language, task)
        kwargs = _generate_kwargs(opts)
        with seeded(opts.seed if kwargs.get("temperature") is not None else None, self.device):
            out = self.model.generate(
                input_features=features,
                attention_mask=inputs["attention_mask"].to(self.device),
                return_timestamps=timestamps or long_form,
                return_segments=True,
                **lang_kwargs,
                **kwargs,
            )
        segments = [
            {"start": float(s["start"]), "end": float(s["end"]), "tokens": s["tokens"].detach().cpu()}
            for s in out["segments"][0]
        ]
        return WhisperOutput(
            sequences=out["sequences"][0].detach().cpu(),
            segments=segments,
            language=code,
            duration=len(samples) / self.sampling_rate,
            timestamps=bool(timestamps),
        )

    def to_transcript(self, out: WhisperOutput) -> Transcript:
        """The :class:`Transcript` of a :meth:`generate` output: text decoded without special or timestamp
        tokens; segments past the end of the audio dropped and times clipped to it, never overlapping."""
        kept: list[tuple[float, float, torch.Tensor]] = []
        prev_end = 0.0
        for s in out.segments:
            start = max(s["start"], prev_end, 0.0)
            if start >= out.duration:  # put in the padding after the audio: nothing was said there
                continue
            end = min(max(s["end"], start), out.duration)
            kept.append((start, end, s["tokens"]))
            prev_end = end
        empty = torch.zeros(0, dtype=torch.long)
        text = self._decode(torch.cat([k[2] for k in kept]) if kept else empty)
        if not out.timestamps:
            segments = [Segment(0.0, round(out.duration, 3), text)] if text else []
            return Transcript(text=text, segments=segments, language=out.language)
        segments = []
        for start, end, tokens in kept:
            seg_text = self._decode(tokens)
            if seg_text:
                segments.append(Segment(round(start, 3), round(end, 3), seg_text))
        return Transcript(text=text, segments=segments, language=out.language)

    # ---- audio and features --------------------------------------------------------------------------

    def waveform(self, audio: Any, sampling_rate: int | None = None) -> np.ndarray:
        """float32 mono samples at :attr:`sampling_rate` from a file path, an open file or an array."""
        if isinstance(audio, (str, os.PathLike)) or hasattr(audio, "read"):
            if sampling_rate is not None:
                raise ValueError("sampling_rate= is for arrays of samples; an audio file carries its own rate")
            return load_audio(audio, self.sampling_rate)
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu().numpy()
        x = np.asarray(audio)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"audio must be a file path or an array of samples, got {type(audio).__name__}")
        if sampling_rate is None:
            raise ValueError(
                "an array of samples needs sampling_rate= (its rate in Hz, e.g. 16000); "
                f"{self.name} hears {self.sampling_rate} Hz and other rates are resampled"
            )
        if x.ndim != 1:
            raise ValueError(
                f"expected a 1-D array of mono samples, got shape {x.shape}; average the channels first "
                "(x.mean(axis=channel_axis))"
            )
        if x.size == 0:
            raise ValueError("the audio holds no samples")
        if np.issubdtype(x.dtype, np.integer):  # PCM: full scale is the type's range (int16: 32768)
            x = x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if int(sampling_rate) != self.sampling_rate:
            x = resample(x, int(sampling_rate), self.sampling_rate)
        return x

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """``input_features`` (1, mel bins, frames) and ``attention_mask`` (1, frames), float32 on CPU.

        Up to 30 s: padded to one 30-second window (how Whisper was trained). Longer: every frame of the
        audio, neither padded nor truncated (transformers' long-form decoding cuts the windows itself).
        """
        fe = self.feature_extractor
        if len(samples) <= self.window_samples:
            kw: dict[str, Any] = {"max_length": self.window_samples}
        else:
            kw = {"truncation": False, "padding": "longest"}
        out = fe(samples, sampling_rate=self.sampling_rate, return_tensors="pt", return_attention_mask=True, **kw)
        return {"input_features": out["input_features"], "attention_mask": out["attention_mask"]}

    # ---- language and task ---------------------------------------------------------------------------

    def normalize_language(self, language: str) -> str:
        """The code of a language given as a code, a name or a token (``"de"``, ``"German"``, ``"<|de|>"``).

        Raises:
            ValueError: a language the model does not know (the message lists those it does).
        """
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        key = language.strip().lower()
        if key.startswith("<|") and key.endswith("|>"):
            key = key[2:-2]
        code = TO_LANGUAGE_CODE.get(key, key)
        if self.english_only:
            if code != "en":
                raise ValueError(f"{self.name} is an English-only model; it cannot take language {language!r}")
            return code
        if f"<|{code}|>" not in self._lang_to_id:
            known = ", ".join(self.languages) or "none"
            raise ValueError(f"{self.name} does not know the language {language!r}; it knows: {known}")
        return code

    def detect_language(self, features: torch.Tensor) -> str | None:
        """The code of the language spoken in the first 30 s of ``input_features`` (as ``generate`` does)."""
        if self.english_only:
            return "en"
        if not self._lang_to_id:
            return None
        lang_id = int(
            self.model.detect_language(
                input_features=features,
                generation_config=self.model.generation_config,
                num_segment_frames=self.window_frames,
            )[0]
        )
        token = next((k for k, v in self._lang_to_id.items() if v == lang_id), None)
        return token.strip("<|>") if token else None

    def _language_and_task(self, features: torch.Tensor, language: str | None, task: str) -> tuple[dict, str | None]:
        """generate's ``language``/``task`` arguments and the language code to report."""
        if self.english_only:  # transformers refuses language= and task= for *.en models
            if language is not None:
                self.normalize_language(language)
            if task != "transcribe":
                raise ValueError(f"{self.name} is an English-only model; it cannot translate (use a multilingual one)")
            return {}, "en"
        if not self._lang_to_id:  # an old generation config: the model's own prompt, no language control
            if language is not None:
                raise ValueError(f"{self.name}'s generation config has no lang_to_id; language= cannot be set")
            return {}, None
        code = self.normalize_language(language) if language is not None else self.detect_language(features)
        return {"language": code, "task": task}, code

    def _decode(self, tokens: torch.Tensor) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _generate_kwargs(opts: GenerationOptions) -> dict[str, Any]:
    """Whisper's generate decides between greedy and sampling by ``temperature`` (None or 0: greedy)."""
    kw = opts.generate_kwargs()
    sample = kw.pop("do_sample")
    kw.pop("temperature", None)
    if sample:
        kw["temperature"] = opts.temperature
    return kw
