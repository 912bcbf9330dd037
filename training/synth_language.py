"""The shapes world's language: captions and questions about a scene, with their answers.

Every question is asked only where its answer is unambiguous (e.g. "What color is the circle?" only
when exactly one circle is present). Phrasings are drawn from the caller's `random.Random` after the
scene itself, so one generator yields the scene, its caption and its questions in a fixed order.
Counts are answered as digits ("0", "3").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from training.synth_scene import COLORS, SHAPES, Scene

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
QUESTION_TYPES = ("color", "shape", "count", "position", "exists", "describe")


@dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str
    params: dict[str, str] = field(default_factory=dict)  # what was asked about, machine-readable


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
    if qtype in ("color", "shape"):  # asked by the other attribute, of values present exactly once
        given, values = ("shape", SHAPES) if qtype == "color" else ("color", tuple(COLORS))
        unique = [v for v in values if scene.count(**{given: v}) == 1]
        if not unique:
            return None
        value = rng.choice(unique)
        answer = next(getattr(o, qtype) for o in objs if getattr(o, given) == value)
        return _ask(rng, qtype, qtype, answer, **{given: value})
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
