"""Evaluation while training (`training.live_eval`): at each `eval_every` the model's answers to held-out
questions, scored by `mllm eval`'s scorer, are logged to metrics.jsonl; they are the very answers and scores
`mllm eval` gives on that step's checkpoint; `--keep-best` keeps the best-scoring model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.synth import write_dataset
from training.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = 8
SETTINGS = {"llm": "lora", "llm_lr": 3e-2, "connector_lr": 3e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "per_device_batch_size": 4, "global_batch_size": 4, "epochs": 10, "warmup_ratio": 0.0, "max_length": 256,
            "precision": "fp32", "save_every": 2, "max_steps": 6}  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 16, seed=0, splits=(("train", 0.75), ("val", 0.25)))


def test_in_training_scores_are_mllm_evals_on_the_same_checkpoint(tiny_config, shapes, tmp_path, capsys):
    from training.evaluate import main as eval_main

    config = tmp_path / "model.json"
    tiny_config.save(config)
    out = tmp_path / "run"
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    assert train_main(["--stage", "instruct", "--data", str(shapes["train"]), "--image-folder", str(shapes["images"]),
                       "--model-config", str(config), "--output", str(out), "--feature-cache", str(tmp_path / "cache"),
                       "--eval-data", str(shapes["val_qa"]), "--eval-every", "2", "--eval-limit", str(LIMIT),
                       "--keep-best", "--report-to", "none", "--quiet", *sets]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "eval_accuracy" in r}
    assert sorted(scored) == [2, 4, 6] and all(r["eval_questions"] == LIMIT for r in scored.values())
    seen = []
    for step in (2, 4):  # checkpoint-2 and checkpoint-4 (save_every=2), scored by the command itself
        answers = tmp_path / f"mllm-eval-{step}"
        assert eval_main(["--model", str(out / f"checkpoint-{step}"), "--data", str(shapes["val_qa"]),
                          "--image-folder", str(shapes["images"]), "--limit", str(LIMIT), "--backend", "transformers",
                          "--device", "cpu", "--output", str(answers)]) == 0  # fmt: skip
        expected = json.loads(answers.with_suffix(".json").read_text())
        during = json.loads((out / "eval" / f"step-{step}.json").read_text())
        assert during["predictions"] == expected["predictions"]  # answer for answer
        assert during["summary"] == expected["summary"]
        assert scored[step]["eval_accuracy"] == expected["summary"]["accuracy"]
        seen.append([p["prediction"] for p in during["predictions"]])
    assert seen[0] != seen[1]  # each evaluation answers with the weights of its own step
    capsys.readouterr()
    best_step = max(sorted(scored), key=lambda s: scored[s]["eval_accuracy"])  # ties: the earliest
    kept = json.loads((out / "best" / "best_score.json").read_text())
    assert kept == {"step": best_step, "eval_accuracy": scored[best_step]["eval_accuracy"]}
    assert (out / "best" / "mllm_config.json").is_file() and (out / "best" / "adapter").is_dir()


def test_eval_flags_are_checked(tiny_config, shapes, tmp_path, capsys):
    args = ["--stage", "instruct", "--data", str(shapes["train"]), "--image-folder", str(shapes["images"]),
            "--output", str(tmp_path / "o")]  # fmt: skip
    assert train_main([*args, "--keep-best"]) == 2
    assert "--keep-best keeps the best --eval-data score: give --eval-data" in capsys.readouterr().err
    assert train_main([*args, "--eval-data", str(shapes["val_qa"]), "--eval-limit", "0"]) == 2
    assert "--eval-limit 0 must be > 0" in capsys.readouterr().err
