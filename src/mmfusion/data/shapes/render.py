"""Drawing a ShapesWorld scene as an image with Pillow, anti-aliased by supersampling.

Every shape is a polygon (or an ellipse for the circle) inside its object's circumscribed circle, so
objects of one size cover comparable areas whatever their shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..scene import COLOURS, SHAPES, Scene


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r / np.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + r * np.sin(a) + r * 0.15) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.deg2rad(-90 + 36 * k)
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    if shape == "cross":
        a, b = r * 0.32, r * 0.95
        return [
            (cx - a, cy - b),
            (cx + a, cy - b),
            (cx + a, cy - a),
            (cx + b, cy - a),
            (cx + b, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + b),
            (cx - a, cy + b),
            (cx - a, cy + a),
            (cx - b, cy + a),
            (cx - b, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}; ShapesWorld draws {list(SHAPES)}")


def render_image(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    big = size * supersample
    img = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.radius * big
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            rr = r * 0.9  # a circle fills its bounding circle; shrink so areas stay comparable
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=colour)
        else:
            draw.polygon(polygon(o.shape, cx, cy, r), fill=colour)
    if supersample > 1:
        img = img.reduce(supersample)
    return img
