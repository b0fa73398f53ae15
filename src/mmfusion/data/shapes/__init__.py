"""ShapesWorld: a seeded, generated multimodal world where the right answer is always known.

Each scene holds one to three coloured shapes on a plain background. From one :class:`Scene` we render
an image (Pillow, anti-aliased by supersampling), write several natural captions whose meaning is kept
in structured form (so a retrieved image can be checked against a caption), and ask VQA questions.
The scene is the single source of truth: later modalities (sound, video) render from the same scene.

Scenes are a pure function of ``(seed, split, index)``, so a split can be streamed in memory, read at
random, exported to disk, and resumed mid-stream with nothing but a counter.

A compositional split holds some shape-colour combinations out of training entirely (no object in a
training scene has them); the ``heldout`` split is made of scenes that each contain at least one.

The parts, one job each: the scene model and vocabulary (:mod:`mmfusion.data.scene`, shared with
:mod:`mmfusion.data.sound`), :mod:`.sampling`, :mod:`.render`, :mod:`.captions`, :mod:`.semantics` (is a
caption true of a scene), :mod:`.matching` (the same for a whole batch), :mod:`.negatives`,
:mod:`.questions`, and :mod:`.world`, which ties them to seeded splits.
"""

from ..scene import COLOURS, DEFAULT_HELDOUT, SHAPES, SIZES, Obj, Scene, all_combos
from .captions import NUMBER_WORDS, PREFIXES, REGION_PHRASES, RELATION_PHRASES, Caption, a_or_an, make_captions
from .matching import describes_matrix
from .questions import QA, make_questions
from .render import polygon, render_image
from .sampling import ShapesConfig, object_count_weights, sample_scene, single_object_scene
from .semantics import MISS_REASONS, caption_kind, describes, satisfies, why_false
from .world import SOUND_STREAM, SPLITS, Sample, ShapesWorld

__all__ = [
    "COLOURS",
    "DEFAULT_HELDOUT",
    "MISS_REASONS",
    "NUMBER_WORDS",
    "PREFIXES",
    "QA",
    "REGION_PHRASES",
    "RELATION_PHRASES",
    "SHAPES",
    "SIZES",
    "SOUND_STREAM",
    "SPLITS",
    "Caption",
    "Obj",
    "Sample",
    "Scene",
    "ShapesConfig",
    "ShapesWorld",
    "all_combos",
    "a_or_an",
    "caption_kind",
    "describes",
    "describes_matrix",
    "make_captions",
    "make_questions",
    "object_count_weights",
    "polygon",
    "render_image",
    "sample_scene",
    "satisfies",
    "single_object_scene",
    "why_false",
]
