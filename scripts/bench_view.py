"""What the classifier's view costs a chat: time to first token of a one-image question with and without it.

The same checkpoint twice: as shipped (the tower's ImageNet classifier read as `classifier_view` words after the
image tokens, `mllm.classifier_view`) and with the view switched off (a config copy; the connector and
adapter are the same). Each turn encodes the image, runs the classifier, prefills the prompt and samples the
first token; the runs alternate so that both see the same machine. Goal: the view adds under 10%.

    .venv/bin/python scripts/bench_view.py [--model default] [--repeats 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

from PIL import Image

from mllm.config import MLLMConfig
from mllm.cpu_features import describe
from mllm.generation import GenerationConfig, stream
from mllm.loading import BUILTIN, load_model


def without_view(checkpoint: Path, folder: Path) -> Path:
    """A copy of `checkpoint` whose config has the classifier's view switched off."""
    target = folder / "no-view"
    shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = MLLMConfig.load(target / "mllm_config.json")
    vision = config.vision.__class__(**{**config.vision.__dict__, "classifier_view": 0})
    tokens = config.tokens_per_image - config.vision.classifier_view
    config.replace(vision=vision, tokens_per_image=tokens).save(target / "mllm_config.json")
    return target


def first_token_s(model, image: Image.Image) -> float:
    gen = GenerationConfig(max_new_tokens=1)
    started = time.perf_counter()
    for _ in stream(model, [{"role": "user", "content": "<image>\nWhat is in this picture?"}], [image], gen):
        break
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(describe())
    checkpoint = BUILTIN.get(args.model, Path(args.model))
    if not MLLMConfig.load(checkpoint / "mllm_config.json").vision.classifier_view:
        raise SystemExit(f"{args.model} has no classifier view (vision.classifier_view is 0)")
    with resources.as_file(resources.files("gradio") / "media_assets/images/cheetah.jpg") as path:
        image = Image.open(path).convert("RGB")
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "with the view": load_model(str(checkpoint)),
            "without": load_model(str(without_view(checkpoint, Path(tmp)))),
        }
        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            first_token_s(model, image)  # warm-up
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(first_token_s(model, image))
    median = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, ms in median.items():
        print(f"{name}: time to first token {ms:.1f} ms (median of {args.repeats})")
    overhead = median["with the view"] / median["without"] - 1
    print(f"the view adds {100 * overhead:+.1f}% (goal: under 10%): {'met' if overhead < 0.10 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
