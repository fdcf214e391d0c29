"""The Shapes world: scenes of coloured shapes, sampled and drawn.

A scene is a list of non-overlapping objects on a plain (or, in hard mode, textured)
background. Every object has a shape, a named colour, a size class and a continuous
position; positions and radii are fractions of the image side so one scene can be drawn
at any resolution. Everything the language side says about a scene is computed from this
scene graph, never from pixels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (55, 175, 70),
    "cyan": (40, 205, 215),
    "blue": (45, 85, 225),
    "purple": (150, 70, 205),
    "white": (240, 240, 240),
}
SIZES: dict[str, float] = {"small": 0.075, "large": 0.13}  # radius as a fraction of the image side
BACKGROUND = (40, 40, 40)

MIN_GAP = 0.03  # free space kept between two objects' bounding circles (fraction of the side)
EDGE_PAD = 0.02  # free space kept between an object and the image border
MAX_OBJECTS = 6
MAX_IMAGE_SIZE = 224
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then downsampled (anti-aliasing)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the width (0 = left edge)
    y: float  # centre, fraction of the height (0 = top edge)
    rotation: float = 0.0  # degrees; 0 except in hard mode

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def bbox(self, image_size: int) -> list[float]:
        """COCO-style [x, y, width, height] box in pixels."""
        r = self.radius * image_size
        return [round(self.x * image_size - r, 2), round(self.y * image_size - r, 2), round(2 * r, 2), round(2 * r, 2)]

    def distance(self, other: ShapeObject) -> float:
        return math.hypot(self.x - other.x, self.y - other.y)

    def to_json(self, image_size: int) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": [round(self.x, 4), round(self.y, 4)],
            "rotation": round(self.rotation, 2),
            "bbox": self.bbox(image_size),
        }

    @classmethod
    def from_json(cls, data: dict) -> ShapeObject:
        x, y = data["position"]
        return cls(data["shape"], data["color"], data["size"], float(x), float(y), float(data.get("rotation", 0.0)))


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    hard: bool = False
    background_seed: int = 0  # seeds the background texture in hard mode


def sample_scene(
    rng: random.Random,
    *,
    allowed_combos: set[tuple[str, str]] | None = None,
    required_combos: set[tuple[str, str]] | None = None,
    hard: bool = False,
    max_objects: int = MAX_OBJECTS,
) -> Scene:
    """Sample 1..max_objects non-overlapping objects.

    allowed_combos limits the (colour, shape) pairs that may appear; required_combos, when
    given, forces at least one object to carry one of those pairs (the compositional split).
    """
    n = rng.randint(1, max_objects)
    combos = sorted(allowed_combos) if allowed_combos is not None else [(c, s) for c in COLORS for s in SHAPES]
    for _attempt in range(100):
        objects: list[ShapeObject] = []
        wanted = [rng.choice(sorted(required_combos))] if required_combos else []
        while len(objects) < n:
            color, shape = wanted.pop() if wanted else rng.choice(combos)
            size = rng.choice(tuple(SIZES))
            placed = _place(rng, size, objects)
            if placed is None:
                break
            rotation = rng.uniform(0, 360) if hard else 0.0
            objects.append(ShapeObject(shape, color, size, placed[0], placed[1], rotation))
        if len(objects) == n:
            return Scene(tuple(objects), hard=hard, background_seed=rng.getrandbits(31))
    raise RuntimeError(f"could not place {n} objects without overlap in 100 attempts")


def _place(rng: random.Random, size: str, placed: list[ShapeObject]) -> tuple[float, float] | None:
    r = SIZES[size]
    lo, hi = r + EDGE_PAD, 1 - r - EDGE_PAD
    for _ in range(200):
        # rounded as written to the scene file, so what is on disk is exactly what was reasoned about
        x, y = round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 4)
        if all(math.hypot(x - o.x, y - o.y) >= r + o.radius + MIN_GAP for o in placed):
            return x, y
    return None


# --- drawing -------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of circumradius ~r centred at (cx, cy); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        points = [(r * 0.8 * sx, r * 0.8 * sy) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    elif shape == "diamond":
        points = [(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]
    elif shape == "triangle":
        points = [(r * math.cos(a), r * 0.15 + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "hexagon":
        points = [(r * 0.95 * math.cos(a), r * 0.95 * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r * 1.05 if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(a), radius * math.sin(a)))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    t = math.radians(rotation)
    cos_t, sin_t = math.cos(t), math.sin(t)
    return [(cx + px * cos_t - py * sin_t, cy + px * sin_t + py * cos_t) for px, py in points]


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of image_size x image_size pixels."""
    if not 16 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be between 16 and {MAX_IMAGE_SIZE} px, got {image_size}")
    big = image_size * SUPERSAMPLE
    canvas = _background(scene, big)
    draw = ImageDraw.Draw(canvas)
    rng = random.Random(scene.background_seed)
    for obj in scene.objects:
        color = COLORS[obj.color]
        if scene.hard:  # colour jitter that keeps the colour name unambiguous
            color = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in color)
        cx, cy, r = obj.x * big, obj.y * big, obj.radius * big
        polygon = shape_polygon(obj.shape, cx, cy, r, obj.rotation)
        if polygon is None:
            draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=color)
        else:
            draw.polygon(polygon, fill=color)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _background(scene: Scene, side: int) -> Image.Image:
    if not scene.hard:
        return Image.new("RGB", (side, side), BACKGROUND)
    # Hard mode: a low-contrast gradient plus coarse noise, different in every image.
    gen = np.random.default_rng(scene.background_seed)
    coarse = gen.integers(-12, 13, size=(side // 16, side // 16, 3))
    noise = np.kron(coarse, np.ones((16, 16, 1), dtype=np.int64))
    ramp = np.linspace(-10, 10, side)[None, :, None] * gen.choice([-1, 1])
    pixels = np.clip(np.array(BACKGROUND)[None, None, :] + noise + ramp, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
