"""One table of everything mmfusion can build, train or load: a :class:`FamilySpec` per model family.

A native family names its config dataclass, its model class, the ``mmfusion train`` tasks that train it (the task
adapter of each), its default preset and the ``mmfusion eval`` kinds that measure it. A pretrained backend names
the Hugging Face ``model_type`` values it reads and the adapter class that loads them. The CLI's task list and
defaults, :func:`mmfusion.train.train`, ``mmfusion models`` and :func:`mmfusion.load` all read this table, so a new
family is one module and one entry in :data:`FAMILIES` (the recipe is in docs/ARCHITECTURE.md).

Entries in layers above ``models`` (task adapters in ``train``, adapters in ``backends``) are written as
``"module:attribute"`` strings and imported on first use: the table stays at the bottom of the stack, and
``import mmfusion`` does not import training or ``transformers``.

Presets are data: ``presets/<name>.json`` holds ``{"family", "description", "config"}``; a family may also
carry presets of its own (:attr:`FamilySpec.presets`).
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError, apply_overrides, from_dict, merge
from ..data.tokenizer import Tokenizer
from .captioner import CaptionerConfig, CaptionModel
from .clip import CLIP, CLIPConfig
from .fusion import FusionClassifier, FusionConfig
from .reranker import Reranker, RerankerConfig
from .video import VideoClassifier, VideoConfig
from .vqa import VQAConfig, VQAModel

PRESET_DIR = Path(__file__).parent / "presets"
Ref = str  # "package.module:attribute", imported by resolve() when first needed


def resolve(ref: Ref | Any) -> Any:
    """The object a ``"module:attribute"`` reference names (anything else is returned as it is)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class FamilySpec:
    """What one model family is and where each of its parts lives.

    Native families set ``config``, ``model`` and usually ``tasks``; pretrained backends set ``source``,
    ``model_types`` and ``adapter``.
    """

    name: str
    help: str  # one line for `mmfusion models` and `mmfusion train --help`
    interface: str  # what it provides: Embedder, Classifier, Captioner, Answerer, Transcriber
    config: type | None = None  # the config dataclass (native)
    model: type[nn.Module] | None = None  # built as model(cfg, tokenizer=..., name=...) (native)
    tasks: dict[str, Ref] = field(default_factory=dict)  # `mmfusion train TASK` -> its task adapter class
    default_preset: str | None = None  # the preset `mmfusion train TASK` uses when none is given
    text_field: str | None = None  # the sub-config with the tokenizer's context_length, for models that read text
    data_config: str | None = None  # the RunConfig section with this family's data options (fusion, video, vqa)
    eval_kinds: tuple[str, ...] = ()  # the `mmfusion eval` kinds that measure it
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # presets given in code, beside presets/*.json
    next_steps: dict[str, str] = field(default_factory=dict)  # task -> what to try after training ({out}: the run)
    source: str = "native"  # native, or where pretrained weights come from (hf)
    model_types: tuple[str, ...] = ()  # pretrained: the Hugging Face config model_type values it loads
    adapter: Ref | None = None  # pretrained: the class whose from_pretrained(source, ...) loads the model
    example: str = ""  # pretrained: a model id to show

    @property
    def native(self) -> bool:
        return self.source == "native"

    def task_adapter(self, task: str) -> type:
        """The adapter class that trains this family as ``task``; an error names the tasks it has."""
        if task not in self.tasks:
            wanted = [f.name for f in FAMILIES.values() if task in f.tasks]
            raise ValueError(
                f"a {self.name} model cannot be trained as `train {task}`: it needs a {' or '.join(wanted) or '?'} "
                f"preset (a {self.name} model trains with: {', '.join(self.tasks) or 'nothing'})"
            )
        return resolve(self.tasks[task])


FAMILIES: dict[str, FamilySpec] = {
    "clip": FamilySpec(
        "clip", "dual-encoder CLIP: embeds images and texts in one space", "Embedder",
        CLIPConfig, CLIP, {"clip": "mmfusion.train.clip_task:ClipTask"}, "clip-tiny", text_field="text",
        eval_kinds=("retrieval", "zeroshot", "all", "composition"),
        next_steps={"clip": "mmfusion index PHOTOS --db photos.index --model {out}"},
    ),
    "fusion": FamilySpec(
        "fusion", "classifier over several modalities' features, fused early, late or by attention", "Classifier",
        FusionConfig, FusionClassifier, {"fusion": "mmfusion.train.fusion_task:FusionTask"}, "fusion-small",
        data_config="fusion", eval_kinds=("fusion",),
    ),
    "captioner": FamilySpec(
        "captioner", "image captioner (ViT encoder + text decoder); also answers questions by generation",
        "Captioner", CaptionerConfig, CaptionModel,
        {"caption": "mmfusion.train.caption_task:CaptionTask", "vqa": "mmfusion.train.vqa_task:GenerativeVQATask",
         "rerank": "mmfusion.train.rerank_task:CaptionRerankTask"},
        "caption-tiny", text_field="decoder", eval_kinds=("caption", "vqa"),
        next_steps={
            "caption": "mmfusion caption --model {out} IMAGE...",
            "rerank": "mmfusion search 'a red circle left of a blue square' --db photos.index --rerank {out}",
            "vqa": "mmfusion ask --model {out} IMAGE 'what colour is the circle?'",
        },
    ),
    "vqa": FamilySpec(
        "vqa", "visual question answering as classification over an answer vocabulary", "Answerer",
        VQAConfig, VQAModel, {"vqa": "mmfusion.train.vqa_task:VQATask"}, "vqa-tiny", text_field="question",
        data_config="vqa", eval_kinds=("vqa",),
        next_steps={"vqa": "mmfusion ask --model {out} IMAGE 'what colour is the circle?'"},
    ),
    "video": FamilySpec(
        "video", "video classifier (TimeSformer divided attention, joint attention or frame pooling)", "Classifier",
        VideoConfig, VideoClassifier, {"video": "mmfusion.train.video_task:VideoTask"}, "video-tiny",
        data_config="video",
    ),
    "reranker": FamilySpec(
        "reranker", "cross-attention scorer of (image, caption) pairs over a CLIP's features: re-ranks a search",
        "Reranker", RerankerConfig, Reranker, {"rerank": "mmfusion.train.rerank_task:RerankTask"}, "rerank-tiny",
        data_config="rerank", eval_kinds=("composition",),
        next_steps={"rerank": "mmfusion search 'a red circle left of a blue square' --db photos.index --rerank {out}"},
    ),
    "hf-clip": FamilySpec(
        "hf-clip", "pretrained CLIP or SigLIP from Hugging Face", "Embedder", source="hf",
        model_types=("clip", "siglip"), adapter="mmfusion.backends.hf:HFEmbedder",
        example="hf:openai/clip-vit-base-patch32", eval_kinds=("retrieval", "zeroshot", "all", "composition"),
    ),
    "hf-blip": FamilySpec(
        "hf-blip", "pretrained BLIP captioner from Hugging Face", "Captioner", source="hf", model_types=("blip",),
        adapter="mmfusion.backends.hf_caption:HFCaptioner", example="hf:Salesforce/blip-image-captioning-base",
        eval_kinds=("caption",),
    ),
    "hf-qwen2_5_vl": FamilySpec(
        "hf-qwen2_5_vl", "pretrained Qwen2.5-VL answerer from Hugging Face", "Answerer", source="hf",
        model_types=("qwen2_5_vl",), adapter="mmfusion.backends.hf_vqa:HFAnswerer",
        example="hf:Qwen/Qwen2.5-VL-3B-Instruct", eval_kinds=("vqa",),
    ),
    "hf-whisper": FamilySpec(
        "hf-whisper", "pretrained Whisper speech-to-text from Hugging Face", "Transcriber", source="hf",
        model_types=("whisper",), adapter="mmfusion.backends.hf_speech:HFTranscriber",
        example="hf:openai/whisper-tiny",
    ),
}  # fmt: skip


def family(name: str) -> FamilySpec:
    """The spec of a registered family; an error lists the known ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def pretrained_family(model_type: str | None) -> FamilySpec:
    """The pretrained backend that reads a Hugging Face ``model_type``."""
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for spec in FAMILIES.values() for t in spec.model_types)
    raise ValueError(f"model type {model_type!r} is not supported; mmfusion runs {', '.join(known)}")


def train_tasks() -> dict[str, FamilySpec]:
    """``mmfusion train`` task -> the family it trains by default: the family that lists the task first among its
    own (``vqa`` trains the vqa classifier; ``train vqa --preset caption-tiny`` answers through a captioner)."""
    return {next(iter(spec.tasks)): spec for spec in FAMILIES.values() if spec.tasks}


def _presets() -> dict[str, dict[str, Any]]:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(PRESET_DIR.glob("*.json"))}
    for spec in FAMILIES.values():
        found.update({name: {"family": spec.name, **p} for name, p in spec.presets.items()})
    return found


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered presets matching a glob pattern (``list_models("clip-*")``)."""
    return [n for n in _presets() if fnmatch.fnmatch(n, pattern)]


def describe_models() -> list[tuple[str, str, str]]:
    """(name, family, description) for every preset."""
    return [(n, p["family"], p.get("description", "")) for n, p in _presets().items()]


def _preset(name: str) -> dict[str, Any]:
    presets = _presets()
    if name not in presets:
        raise KeyError(f"unknown model preset {name!r}; available: {', '.join(presets)}")
    return presets[name]


def preset_family(name: str) -> FamilySpec:
    """The spec of the family a preset belongs to (its config is not built)."""
    return family(_preset(name)["family"])


def model_config(name: str, overrides: dict[str, Any] | list[str] | None = None) -> tuple[str, Any]:
    """The family and the config dataclass of a preset, with overrides applied.

    Args:
        name: a preset name from :func:`list_models`.
        overrides: a nested dict (``{"vision": {"layers": 2}}``) or ``["vision.layers=2"]``.
    """
    preset = _preset(name)
    cfg = from_dict(family(preset["family"]).config, preset["config"], prefix="model.")
    if isinstance(overrides, list):
        cfg = apply_overrides(cfg, overrides)
    elif overrides:
        cfg = merge(cfg, overrides)
    return preset["family"], cfg


def build_model(family_name: str, cfg: Any, tokenizer: Tokenizer | None = None, name: str | None = None) -> nn.Module:
    spec = family(family_name)
    if not spec.native:
        raise ConfigError(f"{family_name} is a pretrained backend: load it with mmfusion.load('{spec.example}')")
    return spec.model(cfg, tokenizer=tokenizer, name=name or family_name)


def create_model(name: str, tokenizer: Tokenizer | None = None, **overrides: Any) -> nn.Module:
    """A freshly initialised model of a preset; keyword arguments override config fields.

    Example:
        >>> model = create_model("clip-tiny", vision={"layers": 2})
    """
    family_name, cfg = model_config(name, overrides)
    return build_model(family_name, cfg, tokenizer, name)
