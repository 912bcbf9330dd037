"""Live tracking through accelerate (`training.tracking`): a run's TensorBoard event files, read back with
TensorBoard's own EventAccumulator, hold each logged step's loss, lr, gradient norm, tokens/s, memory and the
validation loss, the very numbers of metrics.jsonl; `--report-to` choices and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.formats import read_rows
from training.loop import train
from training.stage_config import load_stage
from training.stage_model import model_for_stage
from training.synth import write_dataset
from training.tracking import trackers

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"per_device_batch_size": 4, "global_batch_size": 4, "epochs": 5, "warmup_ratio": 0.0, "max_length": 256}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=0, splits=(("train", 0.75), ("val", 0.25)))


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in folder.iterdir() if p.is_dir()]  # OUTPUT/logs/<stage name>/
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_metrics_of_every_logged_step(tiny_config, shapes, tmp_path):
    stage = load_stage("align", {**SETTINGS, "max_steps": 4, "eval_every": 2})
    torch.manual_seed(0)
    model = model_for_stage(stage, config=tiny_config, device="cpu")
    out = tmp_path / "run"
    train(model, stage, read_rows(shapes["train_captions"], shapes["images"]), out,
          val_rows=read_rows(shapes["val_captions"], shapes["images"]), feature_cache=tmp_path / "cache",
          show_progress=False, report_to="tensorboard")  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    scalars = _events(out / "logs")
    assert {"train/loss", "train/lr_connector", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
            "memory/cpu_memory_gib", "val/loss"} <= scalars.keys()  # fmt: skip
    for tag, key in (("train/loss", "loss"), ("train/lr_connector", "lr_connector"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s"), ("memory/cpu_memory_gib", "cpu_memory_gib")):  # fmt: skip
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in steps] == [1, 2, 3, 4]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in steps], rel=1e-6)  # float32 in events
    assert all(r["tokens_per_s"] > 0 and r["cpu_memory_gib"] > 0.1 for r in steps)
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in scalars["val/loss"]] == [s for s, _ in vals] == [2, 4]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([v for _, v in vals], rel=1e-6)
    assert (out / "loss.png").stat().st_size > 0  # the plot stays


def test_a_resumed_run_replaces_the_points_a_killed_run_logged_past_its_checkpoint(tiny_config, shapes, tmp_path):
    import shutil

    out = tmp_path / "run"

    def run(max_steps, resume=False):
        stage = load_stage("align", {**SETTINGS, "max_steps": max_steps, "save_every": 2})
        torch.manual_seed(0)
        model = model_for_stage(stage, config=tiny_config, device="cpu")
        train(model, stage, read_rows(shapes["train_captions"], shapes["images"]), out, resume=resume,
              feature_cache=tmp_path / "cache", show_progress=False, report_to="tensorboard")  # fmt: skip

    run(3)  # logs steps 1-3; "killed" before step 3's checkpoint:
    shutil.rmtree(out / "checkpoint-3")
    with (out / "metrics.jsonl").open() as f:
        killed = [json.loads(line)["loss"] for line in f]
    run(4, resume=True)  # from checkpoint-2: steps 3 and 4 again
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[:2] == killed[:2] and len(losses) == 4
    # Each step once in the dashboard, with the resumed run's values: the killed run's step 3 is gone.
    assert _events(out / "logs")["train/loss"] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in zip([1, 2, 3, 4], losses)
    ]


def test_report_to_choices(tmp_path):
    assert trackers("none") == [] and trackers("tensorboard") == ["tensorboard"]
    assert trackers("auto") == ["tensorboard"]  # installed here (a base dependency)
    with pytest.raises(ValueError, match="--report-to 'comet'; use one of auto, tensorboard, wandb, none"):
        trackers("comet")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(
            ValueError, match="--report-to wandb needs `pip install wandb` \\(or use --report-to none\\)"
        ):
            trackers("wandb")
    else:
        assert trackers("wandb") == ["wandb"]
