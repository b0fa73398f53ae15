"""The configuration of a training run: what data, which model, how long, how to optimise.

A run is described by :class:`RunConfig`; a YAML file and ``--a.b=value`` overrides fill it, and the
resolved config is written beside the results as ``run.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from ..config import field
from ..data.images import AugmentConfig
from ..data.shapes import ShapesConfig
from ..data.video import ACTIONS
from ..models.registry import FamilySpec, model_config, preset_family


@dataclass
class DataConfig:
    """Where the training pairs come from."""

    source: str = field(
        "shapes",
        "'shapes' for the in-memory ShapesWorld stream, or a folder with captions.jsonl "
        "(or with train/captions.jsonl, as `mmfusion data shapes` writes)",
    )
    shapes: ShapesConfig = field(factory=ShapesConfig, help="ShapesWorld generation (source: shapes)")
    augment: AugmentConfig = field(factory=AugmentConfig, help="train-time augmentation")
    order: Literal["auto", "shuffle", "file"] = field(
        "auto",
        "folder data: shuffle every epoch, or take the first epoch in file order (file); auto picks file "
        "order for a ShapesWorld training export with a curriculum, whose order is the stream's",
    )
    caption_pick: Literal["auto", "random", "first"] = field(
        "auto",
        "which caption of an image a step uses: random, or the first (ShapesWorld's first names every object, so a "
        "captioner learns complete descriptions); auto: first for captioners, random for CLIP",
    )
    tokenizer_captions: int = field(20000, "scenes (or images) whose captions train the BPE tokenizer")
    max_pixels: int = field(100_000_000, "images over this many pixels are skipped before decoding")


@dataclass
class TrainConfig:
    """How long and how to optimise."""

    steps: int | None = field(None, "optimiser steps; or give epochs or time")
    epochs: float | None = field(None, "passes over a folder dataset (not for the endless ShapesWorld stream)")
    time: str | None = field(None, "wall-clock budget such as 90s, 3m or 1h; the schedule is fitted to it")
    batch_size: int = field(
        128,
        "pairs per optimiser step (the contrastive batch: every other pair is a negative); "
        "the global batch: with N processes each takes batch_size / N",
    )
    captions_per_image: int = field(
        1,
        "captions of each image in a batch: the image is encoded once, the text "
        "tower sees k times the captions (cheap supervision for the text side)",
    )
    hard_negatives: int = field(
        0,
        "per image, this many of its captions edited to be false of it join the batch as negatives, as in "
        "NegCLIP (ShapesWorld: attribute and relation swaps, replacements, counts, regions, checked against the "
        "scene; a folder: word swaps of colours, shapes, relation sides, numbers): they teach binding and "
        "spatial words that random negatives never test",
    )
    accum_steps: int = field(1, "split each step into this many micro-batches (same result, less memory)")
    loss: Literal["clip", "siglip", "triplet"] = field(
        "clip", "symmetric InfoNCE, SigLIP sigmoid, or hardest-negative triplet loss"
    )
    positives: Literal["pair", "caption", "meaning"] = field(
        "meaning",
        "which pairs of a batch count as matches: only each image with its own caption (pair), also "
        "images whose captions are the same text (caption), or also every image a caption describes, "
        "where the data says what images show (meaning: ShapesWorld, stream or export; else caption)",
    )
    triplet_margin: float = field(0.2, "margin of the triplet loss")
    lr: float = field(2e-3, "peak learning rate of AdamW")
    min_lr_ratio: float = field(0.0, "final learning rate as a fraction of lr (cosine decay)")
    warmup_steps: int = field(30, "linear warm-up steps (at most a tenth of a run given in steps or epochs)")
    weight_decay: float = field(0.1, "AdamW weight decay on weight matrices (not on gains, biases, temperature)")
    betas: tuple[float, float] = field((0.9, 0.98), "AdamW betas")
    eps: float = field(1e-6, "AdamW epsilon")
    grad_clip: float | None = field(1.0, "clip the global gradient norm to this; null to disable")
    precision: Literal["fp32", "bf16"] = field("fp32", "bf16 autocast (a speed-up on GPUs and CPUs with AMX)")
    device: str = field("auto", "cpu, cuda, cuda:N, or auto (CUDA when present)")
    threads: int | None = field(
        None, "torch CPU threads; default: OMP_NUM_THREADS, else the CPUs this process may use (affinity, cgroup quota)"
    )
    local_loss: bool = field(
        True,
        "with several processes: each scores only its own rows and columns of the "
        "global contrastive loss (memory local x global); false: all of it on each",
    )
    dist_backend: str | None = field(None, "with several processes: gloo or nccl (default: nccl on CUDA, else gloo)")
    seed: int = field(0, "seed of initialisation and data order")
    log_every: int = field(10, "write metrics every N steps")
    save_every: int = field(500, "write a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = field(2, "resumable checkpoints kept; older ones are deleted")
    progress: bool = field(True, "show a progress bar")


@dataclass
class FusionDataConfig:
    """The data and loss of a fusion run (task fusion)."""

    task: Literal["complementary", "correspondence"] = field(
        "complementary", "the ShapesWorld fusion task (data.source shapes): complementary or correspondence"
    )
    train_size: int = field(8000, "ShapesWorld training examples")
    test_size: int = field(2000, "ShapesWorld test examples")
    test_fraction: float = field(0.2, "a feature file: the stratified share held out for the report")
    image_size: int = field(32, "ShapesWorld image side in pixels")
    snr_db: float = field(10.0, "signal-to-noise ratio of ShapesWorld sounds in dB")
    loss: Literal["ce", "focal"] = field("ce", "cross-entropy, or focal loss for long-tailed labels")
    focal_gamma: float = field(2.0, "focusing parameter of the focal loss")
    class_weights: bool = field(False, "weight classes by inverse frequency (long-tailed labels)")
    label_smoothing: float = field(0.0, "label smoothing of the cross-entropy")


@dataclass
class VideoDataConfig:
    """The data of a video run (task video)."""

    actions: tuple[str, ...] = field(ACTIONS, "ShapesWorld: the actions (the classes)")
    max_distractors: int = field(1, "ShapesWorld: still objects beside the acting one, 0..max_distractors")
    train_size: int = field(0, "ShapesWorld: training clips, reused every epoch; 0 streams new clips without end")
    test_size: int = field(1000, "ShapesWorld: test clips for the report (a folder: its test/ split)")
    test_fraction: float = field(0.2, "a folder without a test/ split: the share held out for the report")


@dataclass
class VQADataConfig:
    """The data of a VQA run (task vqa)."""

    questions_per_image: int = field(
        4, "questions asked of each image in a batch (the image is encoded once): train.batch_size counts images"
    )
    caption_share: float = field(
        0.5,
        "generative VQA (a captioner preset): caption images added per question image (their captions "
        "teach which colour goes with which shape)",
    )


@dataclass
class RerankDataConfig:
    """The candidates of a re-ranker run (task rerank): per image, its caption among false ones; per caption, its
    image among others."""

    hard_negatives: int = field(
        6, "per image, captions edited to be false of it (ShapesWorld: checked against the scene; a folder: word swaps)"
    )
    random_captions: int = field(2, "per image, other images' captions from the batch (those true of it are skipped)")
    changed_scenes: int = field(
        3, "ShapesWorld: per caption, its scene minimally changed so the caption is false of it (image-side negatives)"
    )
    random_images: int = field(2, "per caption, other images from the batch (those it is true of are skipped)")
    text_weight: float = field(1.0, "weight of the caption-to-images loss beside the image-to-captions loss")
    caption_weight: float = field(
        1.0, "a captioner trained as a re-ranker (--preset caption-tiny): weight of its captioning loss on the true "
        "pairs beside the ranking losses, so that it still captions"
    )  # fmt: skip
    eval_scenes: int = field(200, "held-out ShapesWorld scenes of the composition report after training (0: none)")
    kinds: tuple[str, ...] = field(
        (), "ShapesWorld: the types of hard negatives and changed scenes drawn (swap_colour, swap_shape, "
        "swap_relation, replace_colour, replace_shape, replace_size, change_count, flip_region); empty: all, "
        "equally. A type listed twice is drawn twice as often, e.g. [swap_relation, swap_relation, change_count, ...] "
        "dwells on what is slowest to learn"
    )  # fmt: skip


@dataclass
class InitConfig:
    """What a run starts from."""

    whiten_patches: int = field(
        512,
        "CLIP runs from scratch: set the ViT's patch embedding to a whitening (PCA) of the patches of the "
        "run's first this-many training images, so its features start decorrelated instead of random "
        "(median semantic P@1 after 3 minutes on ShapesWorld 0.61 -> 0.69); 0 keeps the random init",
    )

    from_clip: str | None = field(
        None, "a trained CLIP checkpoint to start from: the whole model for task clip (its architecture replaces "
        "the preset's: fine-tuning, pruning's recovery), its image encoder (and tokenizer) for caption and vqa, "
        "its towers (and tokenizer) for rerank"
    )  # fmt: skip
    from_captioner: str | None = field(
        None,
        "a trained captioner to fine-tune (its encoder, decoder and tokenizer): on questions (train vqa --preset "
        "caption-tiny), or to re-rank (train rerank --preset caption-tiny)",
    )
    freeze_vision: bool = field(False, "keep the image encoder fixed (train the rest only)")


@dataclass
class DistillConfig:
    """A teacher for a CLIP run (``mmfusion distill``, or pruning's recovery): the student learns from the
    teacher's embeddings besides the pairs."""

    teacher: str | None = field(None, "the teacher: a native run or checkpoint, hf:<hub-id>, or an ONNX export")
    affinity_weight: float = field(
        1.0, "affinity mimicking (TinyCLIP): KL from the teacher's image->text and text->image distributions over "
        "the batch to the student's"
    )  # fmt: skip
    embed_weight: float = field(
        0.0, "embedding regression: 1 - cosine of the student's and the teacher's embeddings; of different widths "
        "through a learned linear projection per modality (student width -> teacher width, starting as the identity "
        "on the leading coordinates), trained with the student and kept in the resumable checkpoints, never in the "
        "student's model; equal widths regress directly, with no projection"
    )  # fmt: skip
    contrastive_weight: float = field(1.0, "the usual contrastive loss on the pairs, beside the teacher's")
    temperature: float | None = field(
        None, "temperature of both distributions (null: the student's own learned temperature)"
    )
    cache: bool = field(
        True, "compute the teacher's text embeddings once per text, and its image embeddings once per image of a "
        "finite dataset without augmentation"
    )  # fmt: skip
    inherit: bool = field(
        False, "weight inheritance (TinyCLIP): initialise the student from a native CLIP teacher with the same inputs "
        "(image and patch size, stem, pooling, activations, vocabulary and context; the teacher's tokenizer) and at "
        "most its sizes: evenly spaced blocks (first and last kept), heads and MLP channels by inherit_by, the "
        "leading channels of every width; a student with the teacher's config starts as the teacher"
    )  # fmt: skip
    inherit_by: Literal["importance", "leading"] = field(
        "importance", "which heads and MLP channels an inherited block keeps: the most important (the first-order "
        "estimate pruning uses, on a few training batches) or the leading ones"
    )  # fmt: skip


@dataclass
class RunConfig:
    """One training run."""

    task: str = field("clip", "what is trained (clip, fusion, caption, vqa or video)")
    preset: str = field("clip-tiny", "model preset (mmfusion models lists them)")
    model: dict[str, Any] = field(factory=dict, help="overrides of the preset's config, e.g. vision.layers")
    data: DataConfig = field(factory=DataConfig, help="training data")
    train: TrainConfig = field(factory=TrainConfig, help="optimisation")
    fusion: FusionDataConfig = field(factory=FusionDataConfig, help="fusion data and loss (task fusion)")
    init: InitConfig = field(factory=InitConfig, help="how a run starts: CLIP patch whitening, checkpoints")
    distill: DistillConfig = field(factory=DistillConfig, help="a teacher the student learns from (task clip)")
    video: VideoDataConfig = field(factory=VideoDataConfig, help="video data (task video)")
    vqa: VQADataConfig = field(factory=VQADataConfig, help="VQA data (task vqa)")
    rerank: RerankDataConfig = field(factory=RerankDataConfig, help="re-ranker candidates (task rerank)")
    out: str = field("runs/clip", "output directory: model/, checkpoints/, metrics.jsonl, plots/")

    def family(self) -> FamilySpec:
        """The spec of the preset's model family."""
        return preset_family(self.preset)

    def model_config(self, expect: str | None = None) -> Any:
        """The preset's typed config with the ``model`` overrides applied: the one place the untyped overrides
        become the family's config dataclass.

        Args:
            expect: the family the caller builds; a preset of another family is an error naming the fix.
        """
        family_name, cfg = model_config(self.preset, self.model)
        if expect is not None and family_name != expect:
            raise ValueError(
                f"preset {self.preset!r} is a {family_name} model; `train {self.task}` needs a {expect} preset "
                "(mmfusion models lists them)"
            )
        return cfg


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'90' or '90s' -> 90.0; '3m' -> 180.0; '2m30s' -> 150.0; '1.5h' -> 5400.0 (seconds)."""
    s = str(text).strip().replace(" ", "")
    parts = list(_DURATION_PART.finditer(s))
    if not s or not parts or "".join(m.group(0) for m in parts) != s:
        raise ValueError(f"cannot read the duration {text!r}; write it like 90s, 3m, 2m30s or 1h")
    units = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = sum(float(m.group(1)) * units[(m.group(2) or "s").lower()] for m in parts)
    if total <= 0:
        raise ValueError(f"the duration {text!r} must be longer than zero")
    return total
