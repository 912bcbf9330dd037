"""The shapes-world dataset on disk: PNG images and LLaVA JSON rows per split (conversations, captions, questions).

`write_dataset` (also `python -m training.synth` / `mllm data synth`) draws image `index` from a generator
seeded by (seed, index) alone (`scene_rng`) and puts it in a split chosen by (seed, index) alone
(`split_of`): a dataset is byte-identical for a seed, and an image keeps its split as `n` grows.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

from mllm.commandline import Parser, UsageError, run
from training.synth_language import caption, questions
from training.synth_scene import make_scene, render


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
    return run(_main, argv, prog="mllm data synth")


def _main(argv: list[str]) -> int:
    parser = Parser(
        prog="mllm data synth", description="Generate the synthetic shapes world as LLaVA JSON + PNG images."
    )
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        paths = write_dataset(args.out, args.n, args.seed, min_objects=args.min_objects, max_objects=args.max_objects)
    except ValueError as e:  # object counts out of range
        raise UsageError(f"mllm data synth: {e}") from e
    splits = ("train", "val", "test")
    summary = ", ".join(f"{name} {len(json.loads(paths[name].read_text()))}" for name in splits)
    n_qa = sum(len(json.loads(paths[f"{name}_qa"].read_text())) for name in splits)
    print(f"wrote {args.n} images to {args.out} ({summary}; {n_qa} questions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
