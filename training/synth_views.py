"""Rows that teach the built-in model to read its classifier's view of a real photo (`mllm.classifier_view`).

No captioned photos exist offline, so these rows are made in the classifier's output space: each pairs a
shapes-world picture with a classifier view drawn like the ones real photos give (a top class, sure or not,
and two of its neighbours: the classes whose classifier weights are closest to it, as a leopard and a jaguar
follow a cheetah), a question about what the picture shows, and the answer that view supports:

    sure (>= 50%)      "This looks like a cheetah."
    maybe (>= 25%)     "It may be a cheetah, or perhaps a leopard; I am not sure."
    unsure (< 25%)     "I am not sure what this shows. My best guesses: cheetah, leopard or jaguar."

Half the views lie over a shapes-world picture, so that the model must read the view, and half over a
picture of no world (`texture`: noise, stripes, blobs), so that what is not a shapes scene reads the view too
(with shapes pictures alone, the views' questions about shapes pictures went to the view as well). Shapes-world pictures keep their own
view (the classifier reads them as envelopes, balls and clocks: `shapes_world_classes`), and the classes the
classifier gives them are never drawn as a photo's top class: a view of those still means a shapes scene.
The mixture written here holds both kinds of rows, so the shapes skill is trained alongside (nothing is
forgotten), and shapes pictures asked the same questions, answered with their captions (`train_captions.json`
beside the shapes rows): the view alone must decide which world a picture is from. `mllm data views` writes it.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

from mllm.classifier_view import MIN_SHARE, confidence, fit_view, imagenet_labels

QUESTIONS = (
    "What is in this picture?",
    "What is in this image?",
    "What is this?",
    "What do you see?",
    "What does this picture show?",
    "What is shown in the image?",
    "Describe the image.",
    "Describe this picture.",
    "What is in the photo?",
    "Can you tell what this is?",
)
NEIGHBOURS = 8  # the second and third classes come from the top class's nearest classes


def texture(seed: int, size: int = 224):
    """A picture of no world: coloured noise, stripes, soft blobs, blocks or gradients (never flat shapes on a
    plain background), the picture under a drawn view."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)

    def noise(octaves: int) -> np.ndarray:  # (size, size, 3) in [0, 1]: value noise, octaves summed
        out = np.zeros((size, size, 3))
        for o in range(octaves):
            grid = (rng.random((2 ** (o + 2),) * 2 + (3,)) * 255).astype(np.uint8)
            out += np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC)) / 255 / 2**o
        return (out - out.min()) / (np.ptp(out) + 1e-9)

    x, y = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size))
    kind = seed % 5
    if kind == 0:
        a = noise(int(rng.integers(3, 7)))
    elif kind == 1:
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 30)
        wave = np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + 6 * noise(3)[..., 0])[..., None]
        a = (wave + 1) / 2 * rng.random(3) + (1 - wave) / 2 * rng.random(3)
    elif kind == 2:
        a = np.zeros((size, size, 3)) + rng.random(3)
        for _ in range(int(rng.integers(5, 40))):
            cx, cy, s = rng.random(), rng.random(), rng.uniform(0.02, 0.25)
            m = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))[..., None]
            a = a * (1 - m) + m * rng.random(3)
        a = np.clip(a + 0.1 * noise(6) - 0.05, 0, 1)
    elif kind == 3:
        blocks = (rng.random((int(rng.integers(4, 40)),) * 2 + (3,)) * 255).astype(np.uint8)
        image = Image.fromarray(blocks).resize((size, size), Image.NEAREST)
        a = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 6)))) / 255
    else:
        c = rng.random((3, 3))
        a = x[..., None] * c[0] + y[..., None] * c[1] + (1 - x[..., None]) * c[2]
        a = np.clip(a / a.max() + rng.uniform(0.05, 0.4) * (noise(7) - 0.5), 0, 1)
    return Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))


def article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def answer(view: list[tuple[str, float]]) -> str:
    """What a view supports (see the module docstring)."""
    first, rest = view[0][0], [name for name, q in view[1:] if q >= MIN_SHARE]
    if confidence(view) == "sure":
        return f"This looks like {article(first)} {first}."
    if confidence(view) == "maybe":
        if rest:
            return f"It may be {article(first)} {first}, or perhaps {article(rest[0])} {rest[0]}; I am not sure."
        return f"It may be {article(first)} {first}; I am not sure."
    guesses = [first, *rest]
    listed = guesses[0] if len(guesses) == 1 else ", ".join(guesses[:-1]) + " or " + guesses[-1]
    return f"I am not sure what this shows. My best guesses: {listed}."


def neighbours(classifier_weight: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """(1000, k) indices of each class's nearest classes by the cosine of their classifier weights."""
    w = torch.nn.functional.normalize(classifier_weight.float(), dim=-1)
    similarity = w @ w.T
    similarity.fill_diagonal_(-2)
    return similarity.topk(k, -1).indices


def draw_view(rng: random.Random, top: int, near: torch.Tensor, labels: list[str]) -> list[tuple[str, float]]:
    """A view like a real photo's: the top class at a probability from sure to lost, two neighbours below it."""
    # Each of the three answers (sure / maybe / unsure: `mllm.classifier_view.confidence`) a third of the time:
    # with most rows sure, a small LLM learns "This looks like" and never hedges.
    p1 = rng.uniform(*rng.choice([(0.5, 0.97), (0.25, 0.5), (0.06, 0.25)]))
    others = rng.sample(near[top].tolist(), 2)
    rest = 1 - p1
    p2 = min(p1 * rng.uniform(0.2, 0.95), rest * rng.uniform(0.2, 0.8))
    p3 = min(p2 * rng.uniform(0.2, 0.95), (rest - p2) * rng.uniform(0.1, 0.7))
    return [(labels[top], round(p1, 2)), (labels[others[0]], round(p2, 2)), (labels[others[1]], round(p3, 2))]


def shapes_world_classes(probabilities: torch.Tensor, min_share: float = 0.005) -> set[int]:
    """Classes among the top 3 of at least `min_share` of the shapes-world pictures (n, 1000)."""
    counts = Counter(probabilities.topk(3, -1).indices.flatten().tolist())
    return {c for c, n in counts.items() if n >= min_share * len(probabilities)}


def classify(images: list[Path], batch: int = 32) -> torch.Tensor:
    """The built-in tower's classifier on `images`: (n, 1000) probabilities."""
    from PIL import Image

    from mllm.classifier_view import ClassifierView
    from mllm.config import VisionConfig
    from mllm.image_processing import ImageProcessor
    from mllm.vision import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower(VisionConfig(kind="efficientnet_lite0", features="final"))
    view = ClassifierView(*tower.imagenet_classifier(), _NoTokenizer(), 1)
    processor = ImageProcessor(
        image_size=tower.image_size, image_mean=tower.image_mean, image_std=tower.image_std, resize_mode="pad"
    )
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.stack(
                [processor.preprocess(Image.open(p).convert("RGB")) for p in images[start : start + batch]]
            )
            out.append(view.probabilities(tower(pixels)))
    return torch.cat(out)


class _NoTokenizer:
    """`classify` needs the classifier alone, not its words."""

    def encode(self, text, add_special_tokens=False):
        return [0]


def write_mixture(
    shapes_rows: Path, out: Path, n_views: int, n_shapes: int, tokenizer, slots: int, seed: int = 0, probe: int = 400
) -> dict:
    """`out`: `n_views` view rows over the shapes pictures of `shapes_rows` (LLaVA JSON) and `n_shapes` of its
    own rows, shuffled. Each view is cut to what fits the model's `slots` view tokens (by its LLM's `tokenizer`),
    so an answer never names a class the model could not read. Returns counts and the shapes-world classes left
    out of the draws."""
    from mllm.vision import EfficientNetLite0Tower

    rows = json.loads(shapes_rows.read_text())
    folder = shapes_rows.parent / "images"
    rng = random.Random(seed)
    labels = imagenet_labels()
    weight, _ = EfficientNetLite0Tower.imagenet_classifier()
    near = neighbours(weight)
    sample = rng.sample(rows, min(probe, len(rows)))
    excluded = shapes_world_classes(classify([folder / r["image"] for r in sample]))
    tops = [c for c in range(len(labels)) if c not in excluded]
    mixture = []
    textures = folder / "textures"
    textures.mkdir(exist_ok=True)
    for i in range(n_views):
        row = rows[i % len(rows)]
        view = fit_view(draw_view(rng, rng.choice(tops), near, labels), tokenizer, slots)
        image = row["image"]
        if i % 2:  # half the views over a picture of no world: what is not a shapes scene reads the view
            image = f"textures/t{seed}-{i}.png"
            if not (folder / image).is_file():
                texture(seed * 100_003 + i).save(folder / image)
        conversation = [
            {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
            {"from": "gpt", "value": answer(view)},
        ]
        mixture.append(
            {
                "id": f"view-{i}",
                "image": row["image"],
                "classifier_view": [list(v) for v in view],
                "conversations": conversation,
            }
        )
    mixture += rng.sample(rows, min(n_shapes, len(rows)))
    # The same questions about shapes pictures, answered with their captions: without these the questions the
    # two worlds share ("What is in this image?") went to the view (a shapes picture became "This looks like an
    # envelope" and the shapes world's `describe` fell from 99% to 34%).
    captions_file = shapes_rows.parent / "train_captions.json"
    if captions_file.is_file():
        captions = json.loads(captions_file.read_text())
        for k, row in enumerate(rng.sample(captions, min(n_shapes // 2, len(captions)))):
            caption = row["conversations"][-1]["value"]
            conversation = [
                {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                {"from": "gpt", "value": caption},
            ]
            mixture.append({"id": f"shapes-asked-{k}", "image": row["image"], "conversations": conversation})
    rng.shuffle(mixture)
    out.write_text(json.dumps(mixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    shapes = len(mixture) - n_views
    return {"views": n_views, "shapes": shapes, "excluded": sorted(labels[c] for c in excluded)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mllm data views", description=__doc__.split("\n\n")[0])
    p.add_argument("shapes", help="a shapes-world LLaVA JSON (`mllm data synth` OUT/train_qa.json); images beside it")
    p.add_argument("out", help="the mixture to write (LLaVA JSON, images in the shapes set's folder)")
    p.add_argument("--views", type=int, default=2000, help="rows that read a classifier view")
    p.add_argument("--shapes-rows", type=int, default=2000, help="shapes-world rows kept in the mixture")
    p.add_argument("--slots", type=int, default=10, help="the model's view tokens per image (vision.classifier_view)")
    p.add_argument("--llm", default="smollm2-135m-instruct", help="the model's LLM (its tokenizer measures the views)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not Path(args.shapes).is_file():
        p.error(f"{args.shapes} does not exist; make one with `mllm data synth OUT` and pass OUT/train_qa.json")
    from mllm.llm import load_tokenizer

    tokenizer = load_tokenizer(args.llm)
    info = write_mixture(
        Path(args.shapes), Path(args.out), args.views, args.shapes_rows, tokenizer, args.slots, args.seed
    )
    print(f"wrote {args.out}: {info['views']} view rows, {info['shapes']} shapes rows")
    print(f"shapes-world classes never drawn as a photo's top class: {', '.join(info['excluded'])}")
    return 0
