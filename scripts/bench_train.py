"""Stage-1 (`align`) training throughput: mllm's loop, with and without the feature cache, against
transformers' `Trainer` + `LlavaForConditionalGeneration`, on the same data and LLM weights, one process.

Every run trains the connector only (tower and LLM frozen) on the same caption rows, with the same batch
size, max length, step count and fp32 on CPU, and all three use mllm's Processor for tokenization and image
preprocessing, so what differs is the training loop and the model code. Warm-up steps are not timed; the
cache's precompute is timed on its own. Prints a markdown table of samples/s and ratios to the baseline.

`--size tiny`: a random 4-layer LLaMA (hidden 256) and a random CLIP tower; the baseline gets the very same
tower, LLM and initial projector weights (the script checks that both give the same first loss).
`--size default`: EfficientNet-Lite0 + SmolLM2-135M; Llava has no EfficientNet, so the baseline's tower is
a random CLIP ViT with the same number of image tokens and about the same FLOPs per image (both printed).
`--size llava`: LLaVA-1.5's tower architecture (CLIP ViT-L/14 at 224 px, 256 tokens, random weights: no hub
here) + SmolLM2-135M, the very same weights in both; the tower costs about as much as the LLM, which is
the case a feature cache exists for.

    .venv/bin/python scripts/bench_train.py                  # tiny, ~1.5 min on 2 cores
    .venv/bin/python scripts/bench_train.py --size default   # ~3 min on 2 idle cores
    .venv/bin/python scripts/bench_train.py --size llava --batch-size 4 --steps 3 --repeats 1 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from mllm.config import LLMConfig, MLLMConfig, VisionConfig
from mllm.model import MLLM
from mllm.tiny import build_clip, build_llama, build_tokenizer
from training.data import ConversationDataset, Row
from training.feature_cache import FeatureCache
from training.formats import read_rows
from training.loop import train
from training.stage_config import StageConfig, load_stage
from training.stage_model import model_for_stage
from training.synth import write_dataset

# The default size's baseline tower: 224 px / patch 32 = 49 tokens, like EfficientNet-Lite0's 7x7 grid, and
# 4 layers of width 384 come to ~0.8 GFLOPs per image, about the EfficientNet's (measured and printed).
FLOPS_MATCHED_CLIP = dict(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, image_size=224, patch_size=32
)


# ---- models ------------------------------------------------------------------------------------


def tiny_config(root: Path) -> MLLMConfig:
    """A random LLaMA (hidden 256, 4 layers) and CLIP tower (hidden 128, 4 layers, 64 px / 8 = 64 tokens)
    saved under `root`, with `mllm.tiny`'s offline-trained tokenizer."""
    llm_dir, clip_dir = root / "tiny-llama", root / "tiny-clip"
    tokenizer = build_tokenizer(llm_dir)
    # `<image>` in the vocabulary, so Llava's embedding lookup of the image slots needs no resize.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    llama = dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    build_llama(llm_dir, tokenizer, seed=0, **llama)
    clip = dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8
    )
    build_clip(clip_dir, seed=0, **clip)
    return MLLMConfig(vision=VisionConfig(kind="hf", path=str(clip_dir)), llm=LLMConfig(path=str(llm_dir)))


# CLIP ViT-L/14 (openai/clip-vit-large-patch14), LLaVA's tower, at 224 px: 16x16 = 256 patch tokens.
CLIP_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)


def llava_config(root: Path) -> MLLMConfig:
    """A random CLIP ViT-L/14 tower saved under `root` (CLIP's own preprocessing) + the offline SmolLM2."""
    clip_dir = root / "clip-vit-l14"
    build_clip(clip_dir, seed=0, **CLIP_L14)
    return MLLMConfig(vision=VisionConfig(kind="hf", path=str(clip_dir)))


def build_llava(model: MLLM, vision_config: CLIPVisionConfig, same_tower: bool) -> LlavaForConditionalGeneration:
    """Llava around a copy of `model`'s LLM weights; the tower and projector are copied too when `same_tower`.

    Only the projector is left trainable, as in LLaVA's stage 1.
    """
    llm = model.llm
    vocab = max(llm.config.vocab_size, model.image_token_id + 1)  # llava-hf adds `<image>` the same way
    text_config = LlamaConfig(**{**llm.config.to_dict(), "vocab_size": vocab})
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        vision_feature_layer=-2,  # mllm's HF towers read the same penultimate layer, CLS dropped
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(config).float().eval()
    state = {k: v for k, v in llm.model.state_dict().items() if k != "embed_tokens.weight"}
    missing, unexpected = llava.model.language_model.load_state_dict(state, strict=False)
    if unexpected or missing != ["embed_tokens.weight"]:
        raise RuntimeError(f"LLM weights do not map onto Llava's: missing {missing}, unexpected {unexpected}")
    n = llm.config.vocab_size
    with torch.no_grad():
        # Rows past the LLM's vocabulary (the image token) are never read: image slots are overwritten.
        llava.model.language_model.embed_tokens.weight.zero_()
        llava.model.language_model.embed_tokens.weight[:n] = llm.get_input_embeddings().weight
        if llava.lm_head.weight is not llava.model.language_model.embed_tokens.weight:
            llava.lm_head.weight.zero_()
            llava.lm_head.weight[:n] = llm.get_output_embeddings().weight
    if same_tower:
        llava.model.vision_tower.load_state_dict(model.vision.model.state_dict())
        proj = model.connector.proj  # mlp2x_gelu: Linear, GELU, Linear, like LlavaMultiModalProjector
        llava.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
        llava.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    for name, param in llava.named_parameters():
        param.requires_grad_(name.startswith("model.multi_modal_projector."))
    return llava


def tower_cost(tower, image_size: int, batch_size: int) -> tuple[float, float]:
    """(GFLOPs per image, ms per image) of a no-grad forward on random pixels."""
    pixels = torch.randn(batch_size, 3, image_size, image_size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            tower(pixels[:1])
        tower(pixels)  # warm-up
        start = time.perf_counter()
        tower(pixels)
        seconds = time.perf_counter() - start
    return counter.get_total_flops() / 1e9, seconds / batch_size * 1e3


def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"


# ---- the runs ----------------------------------------------------------------------------------


def loop_speed(metrics: Path, batch_size: int, warmup: int) -> float:
    """samples/s over the steps after `warmup`, from the loop's own per-interval samples_per_s records
    (rounded to 0.01 there: under 0.3% at the ~2 samples/s of the default size)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    seconds, last = 0.0, warmup
    for record in records:
        if "samples_per_s" in record and record["step"] > warmup:
            seconds += batch_size * (record["step"] - last) / record["samples_per_s"]
            last = record["step"]
    return batch_size * (last - warmup) / seconds


def bench_mllm(
    model: MLLM, stage: StageConfig, rows: list[Row], workdir: Path, cache_root: Path | None, warmup: int
) -> tuple[float, float | None]:
    """(samples/s after warm-up, seconds spent filling the feature cache or None) of `training.loop.train`;
    `cache_root` None runs the tower live."""
    precompute_s = None
    if cache_root is not None:
        # What `train` does first with a cache, done here so that it is timed on its own.
        start = time.perf_counter()
        features = FeatureCache(cache_root, model.vision, model.config.vision, model.processor.image_processor)
        features.precompute(features.missing(i for r in rows for i in r.images), stage.per_device_batch_size, False)
        precompute_s = time.perf_counter() - start
    output = workdir / ("mllm-live" if cache_root is None else "mllm-cache")
    train(model, stage, rows, output, feature_cache=cache_root, show_progress=False)
    return loop_speed(output / "metrics.jsonl", stage.global_batch_size, warmup), precompute_s


class StepClock(TrainerCallback):
    """perf_counter at the end of every optimizer step (after zero_grad, before logging)."""

    def __init__(self):
        self.ends: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.ends[state.global_step] = time.perf_counter()


def bench_trainer(
    llava: LlavaForConditionalGeneration, model: MLLM, stage: StageConfig, rows: list[Row], workdir: Path, warmup: int
) -> float:
    """samples/s after warm-up of transformers' Trainer on the same encoded rows and collation."""
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=stage.per_device_batch_size,
        gradient_accumulation_steps=1,
        max_steps=stage.max_steps,
        learning_rate=stage.connector_lr,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        lr_scheduler_type="cosine",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=stage.num_workers,
        dataloader_drop_last=True,
        remove_unused_columns=False,  # the rows are Encoded samples, not columns
        seed=stage.seed,
    )
    clock = StepClock()
    trainer = Trainer(
        model=llava,
        args=args,
        train_dataset=ConversationDataset(rows, model.processor),
        data_collator=model.processor.collate,  # input_ids, attention_mask, labels, pixel_values
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary to stdout
    trainer.train()
    end = stage.max_steps
    return stage.per_device_batch_size * (end - warmup) / (clock.ends[end] - clock.ends[warmup])


def first_loss_gap(model: MLLM, llava: LlavaForConditionalGeneration, rows: list[Row], batch_size: int) -> float:
    """|loss_mllm - loss_llava| on the first batch: 0 (up to float error) when both hold the same weights."""
    batch = model.processor.collate([ConversationDataset(rows, model.processor)[i] for i in range(batch_size)])
    with torch.no_grad():
        ours = model.eval()(**batch)[1]
        theirs = llava.eval()(**batch).loss
    return abs(float(ours) - float(theirs))


# ---- entry point -------------------------------------------------------------------------------


@dataclass
class Figures:
    runs: dict[str, list[float]]
    """samples/s of every repeat: `cache`, `live` (mllm's loop) and `baseline` (Trainer + Llava)."""
    precompute_s: float
    """Seconds to fill the feature cache (first repeat), outside the timed steps."""
    notes: list[str]
    """Setup lines printed above the table."""


def measure(args: argparse.Namespace) -> Figures:
    same_tower = args.size != "default"  # tiny and llava: the very same tower in both
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        config = {"tiny": tiny_config, "llava": llava_config}.get(args.size, lambda _: MLLMConfig())(workdir)
        paths = write_dataset(workdir / "data", args.images, seed=0, splits=(("train", 1.0),))
        rows = read_rows(paths["train_captions"], paths["images"])
        total = args.warmup + args.steps
        stage = load_stage(
            "align",
            {
                "per_device_batch_size": args.batch_size,
                "global_batch_size": args.batch_size,
                "max_length": args.max_length,
                "epochs": math.ceil(total / (len(rows) // args.batch_size)),
                "max_steps": total,
                "log_every": args.warmup,  # one record closes the warm-up; the next ones time the rest
                "precision": "fp32",  # like the baseline's Trainer: the same arithmetic on both sides
            },
        )
        model = model_for_stage(stage, config=config, device="cpu")
        vision_config = model.vision.model.config if same_tower else CLIPVisionConfig(**FLOPS_MATCHED_CLIP)
        llava = build_llava(model, vision_config, same_tower=same_tower)
        notes = describe(args, model, llava, rows)

        # Interleaved repeats, so a neighbour's load on the machine hits every run alike; the cache is
        # filled in the first one (its precompute is the figure reported), later ones find it full.
        live_model = model_for_stage(stage, config=config, device="cpu")
        runs: dict[str, list[float]] = {"cache": [], "live": [], "baseline": []}
        precompute_s = None
        for repeat in range(args.repeats):
            where = workdir / f"repeat-{repeat}"
            speed, seconds = bench_mllm(model, stage, rows, where, workdir / "feature_cache", args.warmup)
            runs["cache"].append(speed)
            precompute_s = seconds if precompute_s is None else precompute_s
            runs["live"].append(bench_mllm(live_model, stage, rows, where, None, args.warmup)[0])
            runs["baseline"].append(bench_trainer(llava, model, stage, rows, where, args.warmup))
    notes.append(
        f"feature cache precompute: {precompute_s:.1f} s for {len(rows)} images "
        f"({len(rows) / precompute_s:.1f} images/s), not in the timed steps"
    )
    return Figures(runs, precompute_s, notes)


def describe(args: argparse.Namespace, model: MLLM, llava: LlavaForConditionalGeneration, rows: list[Row]) -> list[str]:
    """The setup: sizes, sequence lengths and both towers' measured cost (and, tiny, the same-weights check)."""
    same_tower = args.size != "default"  # tiny and llava: the very same tower in both
    llm, clip = model.llm.config, llava.config.vision_config
    seq = [len(e.input_ids) for e in ConversationDataset(rows, model.processor)]
    ours = tower_cost(model.vision, model.vision.image_size, args.batch_size)
    theirs = tower_cost(
        lambda px: llava.model.vision_tower(pixel_values=px, output_hidden_states=True),
        clip.image_size,
        args.batch_size,
    )
    notes = [
        f"size {args.size}: LLM {count(model.llm)} ({llm.num_hidden_layers} layers, hidden {llm.hidden_size}), "
        f"{model.tokens_per_image} image tokens, sequences {min(seq)}-{max(seq)} tokens (mean {sum(seq) / len(seq):.0f})",
        f"batch {args.batch_size}, max length {args.max_length}, {len(rows)} caption rows, {args.warmup} warm-up + "
        f"{args.steps} timed steps, median of {args.repeats}, fp32, CPU, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        f"mllm tower: {'CLIP (random)' if same_tower else 'EfficientNet-Lite0'}, {count(model.vision)}, "
        f"{ours[0]:.2f} GFLOPs/image, {ours[1]:.1f} ms/image; baseline tower: CLIP ViT "
        f"{clip.num_hidden_layers}x{clip.hidden_size}, patch {clip.patch_size}, {count(llava.model.vision_tower)}, "
        f"{theirs[0]:.2f} GFLOPs/image, {theirs[1]:.1f} ms/image",
    ]
    if same_tower:
        gap = first_loss_gap(model, llava, rows, args.batch_size)
        notes.append(f"same tower, LLM and projector weights in both; first-batch loss gap {gap:.2e}")
    else:
        notes.append(
            "baseline tower differs (Llava has no EfficientNet): a random CLIP of about the same FLOPs and token "
            "count, so the live-tower ratio also compares the two towers' CPU speed; LLM weights are the same"
        )
    return notes


def report(figures: Figures, rows: int) -> list[tuple[str, float, list[float]]]:
    """(run, median samples/s, each repeat) rows of the table; the last one is the baseline."""
    cached, live, baseline = (statistics.median(figures.runs[k]) for k in ("cache", "live", "baseline"))
    amortised = rows / (rows / cached + figures.precompute_s)
    return [
        ("mllm loop, feature cache (precompute excluded)", cached, figures.runs["cache"]),
        ("mllm loop, feature cache, precompute amortised over one pass", amortised, [amortised]),
        ("mllm loop, live tower", live, figures.runs["live"]),
        ("transformers Trainer + LlavaForConditionalGeneration (baseline)", baseline, figures.runs["baseline"]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size", choices=("tiny", "default", "llava"), default="tiny", help="model sizes (see the docstring)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: tiny 24, default 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (tiny 2, default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step (no accumulation)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sample")
    p.add_argument("--images", type=int, default=64, help="synthetic caption rows (one image each)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats, median reported (tiny 3, default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: tiny 1, default all)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    tiny = args.size == "tiny"
    args.steps = args.steps or (24 if tiny else 6)
    args.warmup = args.warmup or (2 if tiny else 1)
    args.repeats = args.repeats or (3 if tiny else 2)
    if min(args.warmup, args.steps, args.repeats) < 1:
        p.error("--warmup, --steps and --repeats must be >= 1")
    if args.images < args.batch_size:
        p.error(f"--images {args.images} is less than one batch (--batch-size {args.batch_size})")
    # Tiny matrices gain nothing from a second thread and lose a lot on a busy 2-core machine.
    torch.set_num_threads(args.threads or (1 if tiny else torch.get_num_threads()))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    began, load = time.perf_counter(), os.getloadavg()[0]

    figures = measure(args)
    table = report(figures, args.images)
    baseline = table[-1][1]
    print("\n".join(figures.notes))
    print("| run | samples/s | each repeat | vs baseline |")
    print("|---|---|---|---|")
    for name, speed, each in table:
        print(f"| {name} | {speed:.2f} | {', '.join(f'{v:.2f}' for v in each)} | {speed / baseline:.2f}x |")
    # Another busy process on a 2-core machine slows every run several times over: say when that was so.
    print(
        f"total wall time {time.perf_counter() - began:.0f} s, load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
    )
    if args.json:
        out = {"size": args.size, "precompute_s": figures.precompute_s, "notes": figures.notes}
        out["runs"] = [
            dict(zip(("run", "samples_per_s", "repeats", "vs_baseline"), (*r, r[1] / baseline))) for r in table
        ]
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
