"""scripts/train_demo.sh runs end to end (cpu profile, a couple of steps per stage, mlp variant).

The full run takes an hour on CPU; this smoke run checks the plumbing every release: synth, stage
`align` on a fresh model, stage `instruct` from it, the untrained floor, and the checkpoints each
stage leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_train_demo_smoke_run(tmp_path):
    env = dict(
        os.environ,
        PROFILE="cpu",
        N="40",
        STEPS="1",
        VARIANTS="mlp",
        PHOTOS="1",  # the real-photo stage too (off by default: it does not keep the shapes world yet)
        EVAL_LIMIT_SMOKE="0",
        OUT=str(tmp_path / "demo"),
        MLLM=f"{sys.executable} -m app.cli",
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train_demo.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_demo: profile cpu (40 images)" in result.stdout
    run = tmp_path / "demo" / "mlp"
    for stage in ("align", "instruct"):
        config = json.loads((run / stage / "mllm_config.json").read_text())
        assert config["vision"]["pool"] == 3 and config["connector"]["kind"] == "mlp2x_gelu"
    assert (run / "instruct" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "untrained" / "mllm_config.json").is_file()
    # Stage 3 (real photos): the classifier's view switched on, trained on the views mixture, the variant's final.
    photos = json.loads((run / "photos" / "mllm_config.json").read_text())
    assert photos["vision"]["classifier_view"] == 10 and photos["tokens_per_image"] == 9 + 10
    views = json.loads((tmp_path / "demo" / "data" / "views.json").read_text())
    assert sum("classifier_view" in row for row in views) == 16
    asked = [row for row in views if row["id"].startswith("shapes-asked-")]  # shapes pictures, the views' questions
    captions = {
        row["image"]: row["conversations"][-1]["value"]
        for row in json.loads((tmp_path / "demo" / "data" / "train_captions.json").read_text())
    }
    assert len(asked) == 8 and all(row["conversations"][1]["value"] == captions[row["image"]] for row in asked)
    assert (run / "final").read_text().strip() == str(run / "photos")


def test_train_demo_refuses_an_unknown_profile(tmp_path):
    env = dict(os.environ, PROFILE="tpu", OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "train_demo.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "PROFILE must be gpu or cpu, got 'tpu'" in result.stderr


def test_train_demo_qformer_smoke_run_with_more_steps(tmp_path):
    # BLIP-2's three stages, then a second instruct schedule from the first one's end (QFORMER_MORE_STEPS).
    env = dict(
        os.environ,
        PROFILE="cpu",
        N="60",  # qformer_pretrain's global batch is 32
        STEPS="1",
        VARIANTS="qformer",
        QFORMER_MORE_STEPS="2",
        EVAL_LIMIT_SMOKE="0",
        OUT=str(tmp_path / "demo"),
        MLLM=f"{sys.executable} -m app.cli",
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train_demo.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "demo" / "qformer"
    for stage in ("qformer_pretrain", "generative", "instruct", "instruct-more"):
        config = json.loads((run / stage / "mllm_config.json").read_text())
        assert config["connector"]["kind"] == "qformer" and config["connector"]["qformer_vision_positions"]
    assert (run / "final").read_text().strip() == str(run / "instruct-more")
    assert (run / "instruct-more" / "adapter" / "adapter_model.safetensors").is_file()
