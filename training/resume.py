"""Training state on disk: resumable checkpoints, the final model, metrics.jsonl and the loss plot.

`OUTPUT/checkpoint-STEP/` holds an mllm checkpoint (loadable with `--init` or `mllm chat`) plus:
  trainer_state.json            step, data position (epoch, step in epoch, sampler seed), the stage
  trainable.safetensors         the trainable weights exactly (float32 masters, whatever the mllm files hold)
  optimizer.pt                  AdamW state; tensors and numbers only, read back with weights_only=True
  rng-RANK.json / .safetensors  python and numpy RNG / torch RNG of each process
Everything is written into `.checkpoint-STEP.tmp/` and renamed: a kill mid-save leaves the earlier
checkpoints intact, and a directory without trainer_state.json is never resumed from.
Under FSDP / DeepSpeed the optimizer state is sharded and saved by `accelerator.save_state`; resuming
such a run is not implemented yet and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from mllm.checkpoint import CONFIG_FILE

STATE_FILE = "trainer_state.json"
# Stage fields that may change between a run and its resume: they do not affect the weights.
RESUMABLE_CHANGES = {"max_steps", "eval_every", "save_every", "log_every", "num_workers"}
# Model files that exist only for some tune settings: stale ones must not survive a new final save.
OPTIONAL_MODEL_FILES = ("vision.safetensors", "adapter", "llm")
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(python + numpy as JSON, torch CPU [+ CUDA] as tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return as_json, tensors


def set_rng_state(state: tuple[dict, dict[str, torch.Tensor]]) -> None:
    as_json, tensors = state
    version, internal, gauss = as_json["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _trainable_names(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def save(output: Path, step_module, optimizer, model, stage, state: dict, accelerator: Accelerator) -> Path:
    """Write `checkpoint-{step}` atomically (all ranks call this)."""
    final = output / f"checkpoint-{state['step']}"
    tmp = output / f".checkpoint-{state['step']}.tmp"
    unwrapped = accelerator.unwrap_model(step_module)
    full_state = accelerator.get_state_dict(step_module)  # gathers shards under FSDP / ZeRO-3: all ranks
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        names = _trainable_names(unwrapped)
        save_file({n: full_state[n].detach().to("cpu").contiguous() for n in names}, tmp / "trainable.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.distributed_type in SHARDED:
        accelerator.save_state(tmp / "accelerate")  # sharded optimizer state in the backend's own format
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    as_json, tensors = rng_state()
    rank = accelerator.process_index
    (tmp / f"rng-{rank}.json").write_text(json.dumps(as_json))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"rng-{rank}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**state, "stage": dataclasses.asdict(stage)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # written last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output: Path) -> Path | None:
    found = [
        (int(m.group(1)), p)
        for p in Path(output).glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def load(output: Path, step_module, optimizer, stage, num_rows: int, accelerator: Accelerator):
    """Restore weights and optimizer from the latest checkpoint; returns (next step, RNG state to set
    right before the first step)."""
    if accelerator.distributed_type in SHARDED:
        raise NotImplementedError("--resume under FSDP / DeepSpeed is not implemented; resume with DDP or one device")
    path = latest_checkpoint(output)
    if path is None:
        raise FileNotFoundError(f"--resume: {output} has no complete checkpoint-STEP directory; drop --resume")
    state = json.loads((path / STATE_FILE).read_text())
    saved, current = state["stage"], dataclasses.asdict(stage)
    changed = sorted(
        k for k in current if k not in RESUMABLE_CHANGES and json.dumps(saved.get(k)) != json.dumps(current[k])
    )
    if changed:
        raise ValueError(f"--resume: {path} was trained with different stage settings {changed}; use the same ones")
    if state["num_rows"] != num_rows:
        raise ValueError(f"--resume: {path} was trained on {state['num_rows']} rows, this data has {num_rows}")
    tensors = load_file(path / "trainable.safetensors")
    names = set(_trainable_names(step_module))
    if set(tensors) != names:
        raise ValueError(
            f"--resume: {path} holds {len(tensors)} trainable tensors that do not match this model's {len(names)}; "
            "resume with the same --init / --model-config as the original run"
        )
    step_module.load_state_dict(tensors, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    rank = accelerator.process_index
    rng = None
    if (path / f"rng-{rank}.json").is_file():
        rng = (json.loads((path / f"rng-{rank}.json").read_text()), load_file(path / f"rng-{rank}.safetensors"))
    else:
        print(f"mllm train: {path} has no RNG state for rank {rank}; dropout masks will differ", file=sys.stderr)
    return state["step"], rng


def save_final_model(model, output: Path) -> None:
    """The final mllm checkpoint in `output` itself, next to the checkpoints and metrics (so not with
    save_pretrained's rename of the whole directory). mllm_config.json moves in last: until then the
    directory is not a checkpoint, never a mix of two runs."""
    tmp = output / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (output / CONFIG_FILE).unlink(missing_ok=True)
    for name in OPTIONAL_MODEL_FILES:
        if not (tmp / name).exists():
            target = output / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


class Metrics:
    """metrics.jsonl, one JSON object a line; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled:
            path.write_text("")

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (val, "val", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
