"""Sharded training checked: `accelerate launch` with the shipped FSDP config runs 2 CPU processes (gloo) through
torch's FSDP, and its losses, validation loss and saved weights are the single-process run's; the shipped
DeepSpeed config (CUDA only) parses as accelerate reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs" / "accelerate"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONPATH": str(REPO),
}
# Stage 2 with LoRA: a frozen tower and LLM beside trainable adapters and connector in one FSDP unit. 3 steps of a
# 3-step schedule (no mid-run checkpoint), fp32 (bf16 sums of 2 rows and of 4 round differently).
SETTINGS = {"llm": "lora", "llm_lr": 1e-2, "connector_lr": 1e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "global_batch_size": 4, "epochs": 5, "total_steps": 3, "warmup_ratio": 0.0, "max_length": 256,
            "precision": "fp32"}  # fmt: skip
LOSS_TOLERANCE = 1e-5  # the same sums split over 2 processes: float32 rounding only (measured: ~5e-7)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 16, seed=0, splits=(("train", 0.75), ("val", 0.25)))


def _train(launcher: list[str], out: Path, per_device: int, tiny_config, shapes, tmp_path) -> dict:
    config = tmp_path / "model.json"
    tiny_config.save(config)
    sets = [a for k, v in {**SETTINGS, "per_device_batch_size": per_device}.items() for a in ("--set", f"{k}={v}")]
    command = [*launcher, "-m", "training.train", "--stage", "instruct", "--data", str(shapes["train"]),
               "--val-data", str(shapes["val"]), "--image-folder", str(shapes["images"]), "--model-config", str(config),
               "--output", str(out), "--feature-cache", str(tmp_path / "cache"), "--report-to", "none", "--quiet",
               *sets]  # fmt: skip
    proc = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fsdp_two_cpu_processes_match_one(tiny_config, shapes, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml")]
    fsdp = _train(launch, tmp_path / "fsdp", 2, tiny_config, shapes, tmp_path)
    single = _train([sys.executable], tmp_path / "single", 4, tiny_config, shapes, tmp_path)
    assert (fsdp["processes"], fsdp["distributed"]) == (2, "FSDP") and single["processes"] == 1
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").open() if '"loss"' in line]
              for run in ("fsdp", "single")}  # fmt: skip
    assert len(losses["fsdp"]) == 3
    assert losses["fsdp"] == pytest.approx(losses["single"], abs=LOSS_TOLERANCE)
    assert fsdp["val_loss"] == pytest.approx(single["val_loss"], abs=LOSS_TOLERANCE)
    # The saved model is whole (FSDP keeps flat shards outside forward) and the single run's.
    files = ["connector.safetensors", "adapter/adapter_model.safetensors"]
    for name in files:
        ours, theirs = load_file(tmp_path / "fsdp" / name), load_file(tmp_path / "single" / name)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert ours[key].shape == theirs[key].shape, key
            assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


def test_the_deepspeed_config_parses_as_accelerate_reads_it():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    cluster = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert cluster.distributed_type == DistributedType.DEEPSPEED and cluster.use_cpu is False
    ds_file = REPO / cluster.deepspeed_config["deepspeed_config_file"]
    assert ds_file == CONFIGS / "zero2.json"
    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_file))  # accelerate's own reading of the JSON (no deepspeed needed)
    assert plugin.zero_stage == 2 and plugin.hf_ds_config.is_zero2()
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_use_orig_params"] is True
