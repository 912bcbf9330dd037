"""What a training run leaves in its output directory besides the checkpoints: the final model,
metrics.jsonl (one JSON object a line) and the loss plot loss.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mllm.atomic import append_durably, fsync_directory, write_text_durably
from mllm.checkpoint import save_pretrained
from mllm.config import CONFIG_FILE
from training.eval_files import read_json_lines

# Model files that exist only for some tune settings: stale ones must not survive a new final save.
OPTIONAL_MODEL_FILES = ("vision.safetensors", "adapter", "llm")


def save_final_model(model, output: Path) -> None:
    """The final mllm checkpoint in `output` itself, next to the checkpoints and metrics (so not with
    save_pretrained's rename of the whole directory). mllm_config.json moves in last: until then the
    directory is not a checkpoint, never a mix of two runs."""
    tmp = output / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    (output / CONFIG_FILE).unlink(missing_ok=True)
    for name in OPTIONAL_MODEL_FILES:
        if not (tmp / name).exists():
            target = output / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        if entry.name == CONFIG_FILE:
            fsync_directory(output)  # the other files' renames are on disk before the config's can be
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    fsync_directory(output)
    tmp.rmdir()


class Metrics:
    """metrics.jsonl: each record a line, on disk before training goes on (a kill loses at most the line being
    written). On resume the lines past the checkpoint's step are dropped, and a last line cut short by the kill
    with a warning (`read_json_lines(appended=True)`); any other bad line is an error naming it."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            resumed = keep_until > 0 and path.is_file()
            kept = [r for r in read_json_lines(path, appended=True) if r["step"] <= keep_until] if resumed else []
            write_text_durably(path, "".join(json.dumps(r) + "\n" for r in kept))  # one step: a kill keeps all

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                append_durably(f, json.dumps(record) + "\n")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against the optimizer step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = read_json_lines(metrics_path, appended=True)
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
