"""What a training run leaves in its output directory besides the checkpoints: the final model,
metrics.jsonl (one JSON object a line) and the loss plot loss.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mllm.checkpoint import save_pretrained
from mllm.config import CONFIG_FILE

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
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


class Metrics:
    """metrics.jsonl; on resume, lines past the checkpoint's step are dropped."""

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
    """Train and validation loss against the optimizer step, from metrics.jsonl."""
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
