"""Resumable checkpoints: `OUTPUT/checkpoint-STEP/`, written atomically, resumed exactly.

A checkpoint directory is an mllm checkpoint (loadable with `--init` or `mllm chat`) plus:
  trainer_state.json   step, data position (epoch, step in epoch, sampler seed), row count, the mixture of
                       datasets (paths, rows, weights), the stage
  accelerate/          `accelerator.save_state`: the optimizer, each process's python / numpy / torch RNG
                       and the accumulation counter; under FSDP / DeepSpeed the backend's own model and
                       optimizer state
  accelerate/trainable.safetensors   otherwise the model's trainable weights exactly (float32 masters),
                       in place of accelerate's whole state dict: the frozen weights are the mllm
                       checkpoint's, or the run's --init
accelerate pickles the optimizer and RNG state (torch.save) and reads them back with weights_only=True.
The data position is the optimizer step (`training.batches.StepBatches`), so no sampler state is saved.

Everything is written into `.checkpoint-STEP.tmp/`, fsynced and swapped in (`mllm.atomic`): a kill mid-save
leaves the earlier checkpoints intact. trainer_state.json is written last, and a directory without it is never
resumed from.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, extract_model_from_parallel
from accelerate.utils.constants import RNG_STATE_NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mllm.atomic import recover, swap_in
from mllm.checkpoint import save_pretrained

STATE_FILE = "trainer_state.json"
ACCELERATE_DIR = "accelerate"
TRAINABLE_FILE = "trainable.safetensors"
# Stage fields that may change between a run and its resume: they do not affect the weights.
RESUMABLE_CHANGES = {"max_steps", "eval_every", "save_every", "log_every", "num_workers"}


@contextmanager
def whole_parameters(accelerator: Accelerator):
    """Under FSDP (1) a parameter outside forward is this rank's shard of it (a flat slice); inside this context
    every rank holds it whole again, read-only: for saving the mllm checkpoint, validation and evaluation. All
    ranks must enter it (it gathers). Elsewhere it does nothing."""
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    (module,) = accelerator._models  # the TrainStep accelerate wrapped
    with FullyShardedDataParallel.summon_full_params(module, writeback=False):
        yield


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in extract_model_from_parallel(module).named_parameters() if p.requires_grad}


def _save_trainable(models: list, weights: list[dict], output_dir: str) -> None:
    """accelerate's pre-save hook: `weights` holds the state dicts accelerate would write whole (not those
    FSDP / DeepSpeed save themselves); the trainable tensors are written instead."""
    if weights:
        (module,) = models
        if PartialState().is_main_process:
            tensors = {n: p.detach().to("cpu").contiguous() for n, p in _trainable(module).items()}
            save_file(tensors, Path(output_dir) / TRAINABLE_FILE)
        weights.clear()


def _load_trainable(models: list, input_dir: str) -> None:
    """accelerate's pre-load hook: `models` are those it would load a whole state dict into."""
    for module in models:
        extract_model_from_parallel(module).load_state_dict(load_file(Path(input_dir) / TRAINABLE_FILE), strict=False)
    models.clear()


def save_checkpoint(output: Path, model, stage, state: dict, accelerator: Accelerator) -> Path:
    """Write `checkpoint-{step}` atomically (all ranks call this): the mllm checkpoint of `model`, then the
    state of everything `accelerator.prepare` was given, then `state` (+ the stage) as trainer_state.json."""
    final = output / f"checkpoint-{state['step']}"
    tmp = output / f".checkpoint-{state['step']}.tmp"  # one name for every rank
    with whole_parameters(accelerator):  # under FSDP every rank takes part in gathering the shards
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tmp)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(_save_trainable)
    try:
        accelerator.save_state(tmp / ACCELERATE_DIR, safe_serialization=True)
    finally:
        hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**state, "stage": dataclasses.asdict(stage)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # written last: marks it complete
        swap_in(tmp, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output: Path) -> Path | None:
    for old in Path(output).glob(".checkpoint-*.old"):  # a kill mid-swap left one aside: put it back first
        recover(old.with_name(old.name[1 : -len(".old")]))
    found = [
        (int(m.group(1)), p)
        for p in Path(output).glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def checkpoint_to_resume(
    output: Path, stage, num_rows: int, step_module: torch.nn.Module, datasets: list[dict] | None = None
) -> tuple[Path, int]:
    """(the latest complete checkpoint, its step), once it is checked to be this run's: the same stage
    settings, rows, mixture of datasets (`Mixture.describe()`) and trainable weights. Nothing is loaded yet:
    `restore_checkpoint` does that."""
    path = latest_checkpoint(output)
    if path is None:
        raise FileNotFoundError(f"--resume: {output} has no complete checkpoint-STEP directory; drop --resume")
    state = json.loads((path / STATE_FILE).read_text())
    # `datasets` came later: a checkpoint written before it had none in its stage.
    saved, current = {"datasets": [], **state["stage"]}, dataclasses.asdict(stage)
    changed = sorted(
        k for k in current if k not in RESUMABLE_CHANGES and json.dumps(saved.get(k)) != json.dumps(current[k])
    )
    if changed:
        raise ValueError(f"--resume: {path} was trained with different stage settings {changed}; use the same ones")
    if state["num_rows"] != num_rows:
        raise ValueError(f"--resume: {path} was trained on {state['num_rows']} rows, this data has {num_rows}")
    if state.get("datasets") != datasets:  # the mixture decides the data order: it must be the same
        raise ValueError(
            f"--resume: {path} was trained on datasets {state.get('datasets')}, this run has {datasets}; "
            "give the same --data sources and weights"
        )
    trainable = path / ACCELERATE_DIR / TRAINABLE_FILE
    if trainable.is_file():  # absent when FSDP / DeepSpeed saved the model in their own format
        with safe_open(trainable, framework="pt") as f:
            saved_names = set(f.keys())
        names = set(_trainable(step_module))
        if saved_names != names:
            raise ValueError(
                f"--resume: {path} holds {len(saved_names)} trainable tensors that do not match this model's "
                f"{len(names)}; resume with the same --init / --model-config as the original run"
            )
    return path, state["step"]


def restore_checkpoint(path: Path, accelerator: Accelerator) -> None:
    """Load the trainable weights, the optimizer and this process's RNG from `path` into what
    `accelerator.prepare` was given. Sets the RNG: call it right before the first step."""
    rank = accelerator.process_index
    if not (path / ACCELERATE_DIR / f"{RNG_STATE_NAME}_{rank}.pkl").is_file():
        print(f"mllm train: {path} has no RNG state for rank {rank}; dropout masks will differ", file=sys.stderr)
    hook = accelerator.register_load_state_pre_hook(_load_trainable)
    try:
        accelerator.load_state(path / ACCELERATE_DIR, load_kwargs={"weights_only": True})
    finally:
        hook.remove()
