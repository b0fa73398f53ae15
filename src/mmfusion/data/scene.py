"""The ShapesWorld scene model: the vocabulary (shapes, colours, sizes) and the scene every modality renders.

A :class:`Scene` is a few :class:`Obj` on a plain background. Images and captions
(:mod:`mmfusion.data.shapes`), sounds (:mod:`mmfusion.data.sound`) and videos all render from it, so it
sits below all of them: each modality imports the scene, none imports another to get it.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (235, 225, 45),
    "green": (45, 180, 65),
    "cyan": (40, 210, 225),
    "blue": (45, 80, 230),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
# Radius of the circumscribed circle, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.10, "large": 0.17}
# One held-out shape per colour, covering every shape: 8 of the 48 combinations.
DEFAULT_HELDOUT: tuple[str, ...] = (
    "red triangle",
    "orange star",
    "yellow cross",
    "green circle",
    "cyan square",
    "blue diamond",
    "purple circle",
    "white triangle",
)


def all_combos() -> list[str]:
    """Every 'colour shape' combination, colours in the outer loop."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class Obj:
    """One object of a scene. Positions are the centre, as fractions of the image side (y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Scene:
    """A few objects on a plain grey background; ``split`` and ``index`` say which draw made it."""

    objects: tuple[Obj, ...]
    background: int  # grey level of the background, 0-255
    split: str = "train"
    index: int = 0

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "index": self.index,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = tuple(Obj(o["shape"], o["colour"], o["size"], float(o["x"]), float(o["y"])) for o in d["objects"])
        return cls(objs, int(d.get("background", 40)), d.get("split", "train"), int(d.get("index", 0)))
