"""Live dashboards through accelerate's own tracking (`Accelerator(log_with=...)`): TensorBoard or Weights & Biases.

    mllm train ... --report-to tensorboard     # OUTPUT/logs/<stage>/: tensorboard --logdir OUTPUT/logs
    mllm train ... --report-to wandb           # the W&B project `mllm`, the run named after OUTPUT
    mllm train ... --report-to none            # metrics.jsonl and loss.png only

`auto` (the command's default) is TensorBoard when it is installed, else none. The same numbers go to
metrics.jsonl, which stays the run's record (the loss plot is drawn from it); the tracker is for watching.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import resource
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

REPORT_TO = ("auto", "tensorboard", "wandb", "none")
LOG_DIR = "logs"


def trackers(report_to: str) -> list[str]:
    """accelerate's `log_with` for `--report-to`; a tracker that is not installed is an error saying what to install."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to {report_to!r}; use one of {', '.join(REPORT_TO)}")
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    if importlib.util.find_spec(report_to) is None:
        raise ValueError(f"--report-to {report_to} needs `pip install {report_to}` (or use --report-to none)")
    return [report_to]


def start(accelerator: Accelerator, stage, output: Path, first_step: int) -> None:
    """Open the run's trackers (no-op without any). A resumed run's TensorBoard events drop what a killed run
    logged past its checkpoint (`purge_step`), so the curves hold each step once."""
    if not accelerator.log_with:
        return
    hparams = {k: v for k, v in dataclasses.asdict(stage).items() if isinstance(v, (bool, int, float, str))}
    init_kwargs = {"wandb": {"dir": str(output), "name": output.name, "resume": "allow"}}
    if first_step:  # steps up to the checkpoint's stay (as in metrics.jsonl); those after it are redone
        init_kwargs["tensorboard"] = {"purge_step": first_step + 1}
    accelerator.init_trackers(stage.name, config=hparams, init_kwargs=init_kwargs)


def memory() -> dict[str, float]:
    """Peak memory so far, GiB: the GPU's allocations (CUDA) or this process's resident set (CPU)."""
    if torch.cuda.is_available():
        return {"gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"cpu_memory_gib": round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)}


def batch_tokens(batch: dict) -> int:
    """Tokens the LLM reads in a micro-batch (padding excluded), for tokens/s."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else 0


def log(accelerator: Accelerator, record: dict, step: int) -> None:
    """A metrics.jsonl record to the trackers: numbers only, grouped by their prefix (train/, val/, eval/)."""
    if accelerator.log_with:
        values = {_tag(k): float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(values, step=step)


def _tag(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    if key.endswith("_gib"):
        return f"memory/{key}"
    return f"train/{key}"
