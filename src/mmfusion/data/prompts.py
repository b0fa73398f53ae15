"""Prompt templates for zero-shot classification (CLIP paper, section 3.1.4) and how to read them.

A template holds ``{}`` where a class name or label goes ("a photo of a {}."); a class is embedded as the
mean over several templates (a prompt ensemble). The template sets live here, below ``eval``, ``tasks``,
``index`` and ``cli``, so every layer that builds prompts reads the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Prompts for photographs, a subset of the CLIP paper's ImageNet ensemble.
PHOTO_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a rendering of a {}.",
    "a cropped photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a low resolution photo of the {}.",
    "a good photo of a {}.",
    "a blurry photo of a {}.",
    "itap of a {}.",
)
# Prompts in the phrasing of ShapesWorld captions.
SHAPES_TEMPLATES = (
    "a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "there is a {}",
    "a photo of a {}",
    "a scene with a {}",
    "a single {}",
)


def read_templates(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Prompt templates: None for the photo ensemble, a file (one per line), '|'-separated text, or a list."""
    if spec is None:
        return PHOTO_TEMPLATES
    if isinstance(spec, str):
        p = Path(spec).expanduser()
        items = p.read_text(encoding="utf-8").splitlines() if p.is_file() else spec.split("|")
    else:
        items = list(spec)
    out = tuple(t.strip() for t in items if t.strip())
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise ValueError(f"prompt templates need a {{}} where the label goes (e.g. 'a photo of a {{}}.'); got {bad}")
    return out
