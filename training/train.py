"""`mllm train`: wires a stage, a model and the data into `training.loop.train`; computes nothing.

    mllm train --stage align --data shapes/train_captions.json --image-folder shapes/images --output runs/align
    mllm train --stage instruct --init runs/align --data shapes/train.json --image-folder shapes/images \\
        --val-data shapes/val.json --output runs/instruct --set llm=qlora --set per_device_batch_size=4
    mllm train --stage instruct --data a.json:0.7 --data b.jsonl:0.3 --image-folder images --output runs/mix

Multi-process: `accelerate launch [--config_file ...] -m training.train ...` or `torchrun -m training.train ...`.
Bad data rows, bad settings and missing files print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mllm.commandline import Parser, UsageError, run
from mllm.config import MLLMConfig
from training.data import DataError
from training.formats import READERS, read_rows
from training.live_eval import LiveEval
from training.loop import make_accelerator, train
from training.mixture import parse_source, read_mixture
from training.stage_config import load_stage
from training.stage_model import model_for_stage
from training.tracking import REPORT_TO


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="mllm train", description="Train one stage (align, instruct, qformer_pretrain, generative).")
    p.add_argument("--stage", help="a preset (align, instruct, qformer_pretrain, generative), a config name or YAML")
    p.add_argument("--config", help="a YAML file of stage settings applied on top of --stage (its `base`)")
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="training rows: LLaVA / ShareGPT / OpenAI JSON or JSONL, a `datasets` folder or Parquet; repeat it for "
        "a mixture sampled by weight (--data a.json:0.7 --data b.jsonl:0.3); default: the stage's `datasets`",
    )
    p.add_argument(
        "--format", choices=READERS, default=None, help="the data's format (default: detected from the rows)"
    )
    p.add_argument("--image-folder", help="where the rows' image paths resolve")
    p.add_argument("--output", required=True, help="run directory: checkpoints, metrics, the final model")
    p.add_argument("--val-data", help="validation rows (any format --data takes)")
    p.add_argument("--eval-data", help="held-out questions scored by `mllm eval`'s scorer during training")
    p.add_argument("--eval-every", type=int, help="optimizer steps between evaluations (validation loss and scores)")
    p.add_argument("--eval-limit", type=int, default=100, help="questions of --eval-data per evaluation (default 100)")
    p.add_argument("--keep-best", action="store_true", help="keep the best-scoring model in OUTPUT/best")
    p.add_argument("--init", help="start from this mllm checkpoint (e.g. the previous stage's output)")
    p.add_argument("--model-config", help="mllm_config.json-style JSON for a fresh model (default: MLLMConfig())")
    p.add_argument("--resume", action="store_true", help="continue from the latest OUTPUT/checkpoint-STEP exactly")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule is unchanged)")
    p.add_argument(
        "--feature-cache",
        default="auto",
        help="frozen-tower feature cache dir, or none (default: OUTPUT/../.feature_cache)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a stage setting (repeatable)"
    )
    p.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default="auto",
        help="live dashboard: tensorboard (logs in OUTPUT/logs), wandb or none (default auto: tensorboard if installed)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.stage and not args.config:
        p.error("give --stage (or --config)")
    if nul := [name for name, value in vars(args).items() if "\0" in str(value)]:  # the OS would raise ValueError
        p.error(f"--{nul[0].replace('_', '-')} holds a NUL byte, which no path can; check it")
    return args


def stage_from_args(args: argparse.Namespace):
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set connector_lr=1e-3")
        overrides[key.strip()] = yaml.safe_load(value) if value else ""
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.eval_every is not None:
        overrides["eval_every"] = args.eval_every
    if args.config:
        base = (yaml.safe_load(Path(args.config).read_text()) or {}).get("base", Path(args.config).stem)
        if args.stage and args.stage != base:
            raise ValueError(f"--config {args.config} is based on stage {base!r}, not --stage {args.stage!r}")
        return load_stage(args.config, overrides)
    return load_stage(args.stage, overrides)


def train_from_args(args: argparse.Namespace) -> int:
    stage = stage_from_args(args)
    model_config = MLLMConfig.load(args.model_config) if args.model_config else None
    # Rows first: a typo in the data fails in milliseconds, before the model loads.
    sources = [parse_source(entry) for entry in args.data or stage.datasets]
    if not sources:
        raise ValueError("no training data: give --data (or `datasets` in the stage YAML)")
    train_rows = read_mixture(sources, args.image_folder, args.format)
    val_rows = read_rows(args.val_data, args.image_folder, args.format) if args.val_data else None
    if args.keep_best and not args.eval_data:
        raise ValueError("--keep-best keeps the best --eval-data score: give --eval-data")
    live_eval = None
    if args.eval_data:
        live_eval = LiveEval(read_rows(args.eval_data, args.image_folder), args.eval_limit, args.keep_best)
    accelerator = make_accelerator(stage, args.report_to, args.output)
    model = model_for_stage(stage, init=args.init, config=model_config, device=accelerator.device)
    cache = None if str(args.feature_cache).lower() == "none" else args.feature_cache
    result = train(
        model,
        stage,
        train_rows,
        args.output,
        val_rows=val_rows,
        accelerator=accelerator,
        resume=args.resume,
        feature_cache=cache,
        show_progress=not args.quiet,
        live_eval=live_eval,
    )
    if accelerator.is_main_process:
        summary = {
            "stage": stage.name,
            "steps": result.steps,
            "loss": result.losses[-1] if result.losses else None,
            "processes": accelerator.num_processes,
            "distributed": accelerator.distributed_type.name,  # NO, MULTI_CPU (DDP), MULTI_GPU, FSDP, DEEPSPEED
        }
        if result.val_loss is not None:
            summary["val_loss"] = result.val_loss
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv, prog="mllm train")


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        return train_from_args(args)
    except DataError as e:
        raise UsageError(f"mllm train: bad data: {e}") from e
    except ValueError as e:  # bad settings: the stage, --set, --resume against another run
        raise UsageError(f"mllm train: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
