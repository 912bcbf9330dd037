"""The shapes world's scenes: the vocabulary, the scene model, sampling a scene and rendering it.

A scene holds 1-5 flat-coloured objects, one per 3x3 cell with its centre well inside the cell, no two
sharing a (colour, shape) pair, on a pale background with grey clutter: everything a question can ask
stays unambiguous, so a tiny model (EfficientNet-Lite0, 7x7 tokens + a 135M LLM) can learn it.
Vocabulary: shapes `SHAPES`, colours `COLORS`, sizes small / large, positions "<row> <col>" with rows
top / middle / bottom and columns left / center / right.

`make_scene` draws everything from the caller's `random.Random`, so a scene is a pure function of the
generator's state; `render` is a pure function of the scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 224
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Saturated and pairwise far apart in RGB; background pixels keep every channel >= 207, so none is close.
COLORS = {
    "red": (220, 20, 30),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 30, 180),
    "orange": (255, 130, 0),
}
SIZES = {"small": 36, "large": 64}  # bounding-box side in pixels
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
MAX_OBJECTS = 5
_CELL = CANVAS / 3
_JITTER = 12  # centre stays within +-12 px of its cell centre, i.e. >= 25 px from any third border
_GAP = 6  # minimum free pixels between two objects' bounding boxes
_EDGE = 4  # minimum free pixels between an object and the canvas edge


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: int
    cy: int

    @property
    def half(self) -> int:
        return SIZES[self.size] // 2

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.cx - self.half, self.cy - self.half, self.cx + self.half, self.cy + self.half)

    @property
    def position(self) -> str:
        """Row and column third of the centre, e.g. "top left" or "middle center"."""
        return f"{ROWS[int(self.cy // _CELL)]} {COLS[int(self.cx // _CELL)]}"


@dataclass(frozen=True)
class Background:
    kind: str  # plain | gradient | noise
    color_a: tuple[int, int, int]
    color_b: tuple[int, int, int]
    vertical: bool
    noise_seed: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: Background
    lines: tuple[tuple[int, int, int, int, int], ...]  # (x0, y0, x1, y1, grey)
    dots: tuple[tuple[int, int, int], ...]  # (x, y, grey)

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum((color is None or o.color == color) and (shape is None or o.shape == shape) for o in self.objects)


def _pastel(rng: random.Random) -> tuple[int, int, int]:
    # Light and nearly grey: every channel high so no background can pass for an object colour.
    base = rng.randint(225, 248)
    return tuple(min(255, base + rng.randint(-10, 7)) for _ in range(3))  # type: ignore[return-value]


def _disjoint(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + _GAP <= bx0 or bx1 + _GAP <= ax0 or ay1 + _GAP <= by0 or by1 + _GAP <= ay0


def _place(rng: random.Random, cell: int, size: str, jitter: int) -> tuple[int, int]:
    half = SIZES[size] // 2
    lo, hi = half + _EDGE, CANVAS - half - _EDGE
    cx = round((cell % 3 + 0.5) * _CELL) + rng.randint(-jitter, jitter)
    cy = round((cell // 3 + 0.5) * _CELL) + rng.randint(-jitter, jitter)
    return min(max(cx, lo), hi), min(max(cy, lo), hi)


def make_scene(rng: random.Random, *, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """Sample a scene; `min_objects` / `max_objects` are the curriculum knob (1 <= min <= max <= 5)."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    n = rng.randint(min_objects, max_objects)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)  # unique (colour, shape) pairs
    cells = rng.sample(range(9), n)  # one object per cell keeps position answers unique and clear
    sizes = [rng.choice(tuple(SIZES)) for _ in range(n)]
    # Rejection-sample jittered centres; exact cell centres are always disjoint (74 px apart > 64 + gap),
    # so after a few failed rounds fall back to them instead of looping forever.
    for attempt in range(11):
        jitter = _JITTER if attempt < 10 else 0
        objs: list[Obj] = []
        for (color, shape), cell, size in zip(pairs, cells, sizes):
            for _ in range(20):
                cand = Obj(shape, color, size, *_place(rng, cell, size, jitter))
                if all(_disjoint(cand, o) for o in objs):
                    objs.append(cand)
                    break
        if len(objs) == n:
            break
    kind = rng.choice(("plain", "gradient", "noise"))
    background = Background(kind, _pastel(rng), _pastel(rng), rng.random() < 0.5, rng.getrandbits(32))
    # Mid grey, 1 px lines and 3 px dots: visible distractors that never pass for an object.
    xy = lambda: rng.randrange(CANVAS)  # noqa: E731
    lines = tuple((xy(), xy(), xy(), xy(), rng.randint(150, 200)) for _ in range(rng.randint(0, 3)))
    dots = tuple((xy(), xy(), rng.randint(150, 200)) for _ in range(rng.randint(0, 12)))
    return Scene(tuple(sorted(objs, key=lambda o: (o.cy // _CELL, o.cx // _CELL))), background, lines, dots)


def _background(bg: Background) -> np.ndarray:
    a, b = np.array(bg.color_a, np.float32), np.array(bg.color_b, np.float32)
    if bg.kind == "gradient":
        t = np.linspace(0.0, 1.0, CANVAS, dtype=np.float32)
        ramp = a + (b - a) * t[:, None]  # (CANVAS, 3)
        img = np.broadcast_to(ramp[:, None, :] if bg.vertical else ramp[None, :, :], (CANVAS, CANVAS, 3))
    else:
        img = np.broadcast_to(a, (CANVAS, CANVAS, 3))
    if bg.kind == "noise":
        noise = np.random.default_rng(bg.noise_seed).integers(-8, 9, (CANVAS, CANVAS, 1))
        img = img + noise  # same offset on all channels: brightness speckle, no colour cast
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    x0, y0, x1, y1 = o.bbox
    fill = COLORS[o.color]
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
        inset = round(o.half * 0.12)  # a full-box square looks much bigger than the other shapes
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(o.cx, y0), (x1, o.cy), (o.cx, y1), (x0, o.cy)], fill=fill)
    elif o.shape == "cross":
        arm = round(o.half * 0.36)
        draw.rectangle((x0, o.cy - arm, x1, o.cy + arm), fill=fill)
        draw.rectangle((o.cx - arm, y0, o.cx + arm, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a CANVAS x CANVAS RGB image (pure function of the scene)."""
    img = Image.fromarray(_background(scene.background), "RGB")
    draw = ImageDraw.Draw(img)
    # Clutter goes first so objects cover it: their silhouettes and centre colours stay exact.
    for x0, y0, x1, y1, g in scene.lines:
        draw.line((x0, y0, x1, y1), fill=(g, g, g), width=1)
    for x, y, g in scene.dots:
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(g, g, g))
    for o in scene.objects:
        _draw(draw, o)
    return img
