"""The shapes world: a deterministic generator of synthetic images, captions and questions.

Each image holds 1-5 flat-coloured objects on a light background. Everything a question can ask
is kept unambiguous so that a tiny model (EfficientNet-Lite0, 7x7 tokens + a 135M LLM) can learn
it: one object per 3x3 cell with its centre well inside the cell, no two objects sharing a
(colour, shape) pair, saturated colours far from the pale backgrounds, grey clutter only.

Vocabulary: shapes `SHAPES`, colours `COLORS`, sizes small / large, positions "<row> <col>" with
rows top / middle / bottom and columns left / center / right, counts as digits ("0", "3").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 224
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
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
QUESTION_TYPES = ("color", "shape", "count", "position", "exists", "describe")


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


@dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str
    params: dict[str, str] = field(default_factory=dict)  # what was asked about, machine-readable


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


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """One sentence naming every object (size, colour, shape, position) in reading order.

    With `rng`, one of three phrasings (variety for alignment captions); without, the canonical
    one that `describe` answers use, so an exact-match score of descriptions is meaningful.
    """
    body = _join([f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects])
    n = len(scene.objects)
    style = rng.randrange(3) if rng is not None else 1
    if style == 0:
        return f"{body[0].upper()}{body[1:]}."
    if style == 1:
        return f"There {'is' if n == 1 else 'are'} {n} object{'' if n == 1 else 's'}: {body}."
    return f"The image shows {body}."


_TEMPLATES = {
    "color": ("What color is the {shape}?", "What is the color of the {shape}?", "Which color does the {shape} have?"),
    "shape": (
        "What shape is the {color} object?",
        "What is the shape of the {color} object?",
        "Which shape is {color}?",
    ),
    "count": ("How many objects are there?", "How many objects are in the image?", "Count the objects in the image."),
    "count_color": (
        "How many {color} objects are there?",
        "Count the {color} objects.",
        "How many objects are {color}?",
    ),
    "count_shape": ("How many {shapes} are there?", "Count the {shapes}.", "How many {shapes} are in the image?"),
    "position": (
        "Where is the {color} {shape}?",
        "Where is the {color} {shape} located?",
        "In which part of the image is the {color} {shape}?",
    ),
    "exists": (
        "Is there {a} {color} {shape}?",
        "Is there {a} {color} {shape} in the image?",
        "Can you see {a} {color} {shape}?",
        "Does the image contain {a} {color} {shape}?",
    ),
    "describe": ("Describe the image.", "What is in this image?", "Give a short description of the image."),
}


def _ask(rng: random.Random, key: str, qtype: str, answer: str, **params: str) -> QA:
    article = "an" if params.get("color", "").startswith(("a", "e", "i", "o", "u")) else "a"
    fmt = dict(params, shapes=PLURALS.get(params.get("shape", ""), ""), a=article)
    return QA(qtype, rng.choice(_TEMPLATES[key]).format(**fmt), answer, params)


def _one_question(scene: Scene, rng: random.Random, qtype: str, cap: str) -> QA | None:
    """A question of `qtype`, or None when the scene has nothing it can be asked about unambiguously."""
    objs = scene.objects
    if qtype == "color":  # only shapes present exactly once have a single colour answer
        shapes = [s for s in SHAPES if scene.count(shape=s) == 1]
        if not shapes:
            return None
        shape = rng.choice(shapes)
        return _ask(rng, "color", qtype, next(o.color for o in objs if o.shape == shape), shape=shape)
    if qtype == "shape":
        colors = [c for c in COLORS if scene.count(color=c) == 1]
        if not colors:
            return None
        color = rng.choice(colors)
        return _ask(rng, "shape", qtype, next(o.shape for o in objs if o.color == color), color=color)
    if qtype == "count":
        kind = rng.randrange(3)
        if kind == 0:
            return _ask(rng, "count", qtype, str(len(objs)))
        # Half the time ask about something present, otherwise any value (often giving "0").
        o = rng.choice(objs)
        if kind == 1:
            color = o.color if rng.random() < 0.5 else rng.choice(tuple(COLORS))
            return _ask(rng, "count_color", qtype, str(scene.count(color=color)), color=color)
        shape = o.shape if rng.random() < 0.5 else rng.choice(SHAPES)
        return _ask(rng, "count_shape", qtype, str(scene.count(shape=shape)), shape=shape)
    if qtype == "position":
        o = rng.choice(objs)
        return _ask(rng, "position", qtype, o.position, color=o.color, shape=o.shape)
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return _ask(rng, "exists", qtype, "yes", color=o.color, shape=o.shape)
        present = {(o.color, o.shape) for o in objs}
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        return _ask(rng, "exists", qtype, "no", color=color, shape=shape)
    if qtype == "describe":
        return _ask(rng, "describe", qtype, cap)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def questions(scene: Scene, rng: random.Random, *, max_turns: int = 4, caption_text: str | None = None) -> list[QA]:
    """1..max_turns distinct questions; `describe` answers with `caption_text` (a fresh caption if None)."""
    cap = caption_text if caption_text is not None else caption(scene)
    n_turns = rng.randint(1, max_turns)
    out: list[QA] = []
    for _ in range(8 * n_turns):  # bounded: a 1-object scene may not offer n_turns distinct questions
        if len(out) == n_turns:
            break
        qa = _one_question(scene, rng, rng.choice(QUESTION_TYPES), cap)
        # Same type and subject = same question, even when phrased differently: skip it.
        if qa is not None and all((q.type, q.params) != (qa.type, qa.params) for q in out):
            out.append(qa)
    return out


def _unit(*key: object) -> float:
    """A stable float in [0, 1) from the key (sha256, so independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def split_of(seed: int, index: int, splits: tuple[tuple[str, float], ...]) -> str:
    """The split of image `index`: depends only on (seed, index), so it is stable as `n` grows."""
    u, acc = _unit("split", seed, index), 0.0
    for name, share in splits:
        acc += share
        if u < acc:
            return name
    return splits[-1][0]


def scene_rng(seed: int, index: int) -> random.Random:
    """The generator of image `index`: its scene (first draw), then its caption and questions."""
    return random.Random(int(_unit("scene", seed, index) * 2**53))


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    splits: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.1), ("test", 0.1)),
) -> dict[str, Path]:
    """Write images and LLaVA JSON files; returns {"images": dir, "<split>": ..., "<split>_captions": ...,
    "<split>_qa": ...} paths."""
    names = [name for name, _ in splits]
    if not splits or len(set(names)) != len(names) or any(s < 0 for _, s in splits):
        raise ValueError(f"splits must be unique names with non-negative shares, got {splits}")
    if abs(sum(s for _, s in splits) - 1.0) > 1e-6:
        raise ValueError(f"split shares must sum to 1, got {splits}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list]] = {name: {"": [], "_captions": [], "_qa": []} for name in names}
    for index in range(n):
        rng = scene_rng(seed, index)
        scene = make_scene(rng, min_objects=min_objects, max_objects=max_objects)
        cap = caption(scene, rng)
        qas = questions(scene, rng)  # describe answers use the canonical caption
        image_id = f"s{seed}-{index:06d}"
        image = f"{image_id}.png"
        render(scene).save(out / "images" / image, compress_level=1)  # fast; pixels are what must match
        conv = []  # the image placeholder opens the first human turn only
        for k, qa in enumerate(qas):
            conv += [_turn("human", ("<image>\n" if k == 0 else "") + qa.question), _turn("gpt", qa.answer)]
        split = rows[split_of(seed, index, splits)]
        split[""].append({"id": image_id, "image": image, "conversations": conv, "qa": [asdict(q) for q in qas]})
        split["_captions"].append(
            {"id": image_id, "image": image, "conversations": [_turn("human", "<image>"), _turn("gpt", cap)]}
        )
        for k, qa in enumerate(qas):
            turns = [_turn("human", f"<image>\n{qa.question}"), _turn("gpt", qa.answer)]
            split["_qa"].append({"id": f"{image_id}_q{k}", "image": image, "type": qa.type, "conversations": turns})
    paths = {"images": out / "images"}
    for name, kinds in rows.items():
        for suffix, data in kinds.items():
            path = out / f"{name}{suffix}.json"
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            paths[f"{name}{suffix}"] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes world as LLaVA JSON + PNG images.")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=4)
    args = parser.parse_args(argv)
    paths = write_dataset(args.out, args.n, args.seed, min_objects=args.min_objects, max_objects=args.max_objects)
    splits = ("train", "val", "test")
    summary = ", ".join(f"{name} {len(json.loads(paths[name].read_text()))}" for name in splits)
    n_qa = sum(len(json.loads(paths[f"{name}_qa"].read_text())) for name in splits)
    print(f"wrote {args.n} images to {args.out} ({summary}; {n_qa} questions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
