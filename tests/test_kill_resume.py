"""A real SIGKILL of `mllm eval` and of `mllm train` mid-run, then the same command again: the results are the
uninterrupted run's. Each command runs as its own process (`python -m app.cli ...`), killed from outside while
it works and writes, as `kill -9` or the OOM killer stops it: no handler runs, no file is closed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
# One thread in every process: the tiny matrices gain nothing from more, and the killed runs and the reference
# run then add up their sums in the same order (the comparisons below are exact).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TIMEOUT_S = 300  # per process; a hang fails the test instead of the suite


def _start(command: str, *args: str, log: Path) -> subprocess.Popen:
    """`mllm COMMAND ARGS` as its own process, its stdout to `log` and its stderr to `log`.err (files: a pipe
    nobody reads could fill and stall it)."""
    with log.open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "app.cli", command, *args], cwd=REPO, env=ENV, stdout=out,
                                stderr=err)  # fmt: skip


def _finish(proc: subprocess.Popen, log: Path) -> tuple[str, str]:
    """Wait for a run that is let finish: (its stdout, its stderr)."""
    err = log.with_suffix(".err")
    assert proc.wait(TIMEOUT_S) == 0, err.read_text()[-3000:]
    return log.read_text(), err.read_text()


def _kill_when(proc: subprocess.Popen, ready, log: Path, delay_s: float = 0.0) -> None:
    """Poll until `ready()`, wait `delay_s`, SIGKILL. Fails if the run ended first: then nothing was killed."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.with_suffix('.err').read_text()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    time.sleep(delay_s)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(TIMEOUT_S) == -signal.SIGKILL


# ---- mllm eval ------------------------------------------------------------------------------------

QUESTIONS = 48  # of 52 shapes-world questions: about a second of answers a run, for the kills to land inside


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("questions"), 24, seed=0, splits=(("eval", 1.0),))


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory) -> Path:
    from mllm.assembly import build_model
    from mllm.checkpoint import save_pretrained

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("kill-ckpt") / "ckpt"
    save_pretrained(build_model(tiny_config, device="cpu").eval(), directory)
    return directory


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _answered(path: Path) -> int:
    """Answers in the file now, read while the run appends: lines whose newline has landed (bytes, as a read in
    the middle of a write may end inside a character)."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _without_answer_id(line: str) -> dict:
    row = json.loads(line)
    assert len(row.pop("answer_id")) == 32  # a fresh uuid4 per answer: the one field two runs cannot share
    return row


def test_eval_killed_twice_with_sigkill_resumes_to_the_uninterrupted_answers_and_scores(
    checkpoint, questions, tmp_path
):
    # torch's int4 path, 4 questions decoded together: a batched run whose answers do not depend on which
    # questions share a batch (narrower than its bf16 width), so a resumed run must give the very same lines.
    # (On llama.cpp a row's rounding can depend on the batch it is in: a resumed batched run may differ at a
    # near-tie.)
    args = ["eval", "--model", str(checkpoint), "--data", str(questions["eval_qa"]), "--image-folder",
            str(questions["images"]), "--limit", str(QUESTIONS), "--max-new-tokens", "24", "--batch-size", "4",
            "--backend", "int4"]  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    reference, _ = _finish(
        _start(*args, "--answers-file", str(whole), log=tmp_path / "whole.log"), tmp_path / "whole.log"
    )
    expected = _lines(whole)
    assert len(expected) == QUESTIONS

    answers, rng = tmp_path / "killed.jsonl", random.Random(0)
    # First kill: at a random moment once answers are being written (an answer's write and fsync, the decode).
    log = tmp_path / "run1.log"
    proc = _start(*args, "--answers-file", str(answers), log=log)
    _kill_when(proc, lambda: _answered(answers) >= 6, log, delay_s=rng.uniform(0, 0.05))
    first = _lines(answers)
    assert 6 <= len(first) < QUESTIONS
    # Second kill, in a resumed run: right after a line reaches the file ...
    log = tmp_path / "run2.log"
    proc = _start(*args, "--answers-file", str(answers), log=log)
    _kill_when(proc, lambda: _answered(answers) >= len(first) + 5, log)
    second = _lines(answers)
    assert len(first) + 5 <= len(second) < QUESTIONS
    # ... and with that line torn in half, the state a crash in the middle of its write leaves (a SIGKILL cannot
    # split one small write() call, so the cut is made here).
    data = answers.read_bytes().rstrip(b"\n")
    answers.write_bytes(data[: len(data) - len(second[-1].encode()) // 2])
    log = tmp_path / "run3.log"
    resumed, warnings = _finish(_start(*args, "--answers-file", str(answers), log=log), log)
    assert f"{answers}: dropped line {len(second)}, cut off mid-write by a killed run" in warnings

    lines = _lines(answers)
    # Line for line the uninterrupted run's answers, in the same order: none lost, none twice, the torn one
    # answered again.
    assert [_without_answer_id(line) for line in lines] == [_without_answer_id(line) for line in expected]
    assert resumed == reference and f"| **overall** | {QUESTIONS} |" in resumed  # the same scores: the per-type table


# ---- mllm train -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 16, seed=0, splits=(("train", 0.75), ("val", 0.25)))


# Instruction tuning with LoRA dropout on, 2 micro-batches a step, warmup and cosine decay: a resume must bring
# back the weights, the optimizer, the RNG (the dropout masks) and the data position in a mixture of two datasets.
# A checkpoint every step, so the kills land in checkpoint writes as well as in steps.
TRAIN_SETTINGS = {
    "llm": "lora",
    "llm_lr": 1e-2,
    "connector_lr": 1e-3,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "per_device_batch_size": 2,
    "global_batch_size": 4,
    "epochs": 4,  # a mixture of 11 + 11 rows, 4 a step: 5 steps an epoch (the rest dropped), STEPS in all (~0.1 s each)
    "warmup_ratio": 0.2,
    "max_length": 256,
    "save_every": 1,
}
STEPS = 20


def _checkpoints(output: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if (p / "trainer_state.json").exists())


def _metrics(output: Path) -> list[dict]:
    rows = [json.loads(line) for line in _lines(output / "metrics.jsonl")]
    clock = {"samples_per_s", "tokens_per_s", "cpu_memory_gib", "gpu_memory_gib"}  # the clock's and the process's
    return [{k: v for k, v in row.items() if k not in clock} for row in rows]


def _logged_steps(output: Path) -> list[int]:
    """The steps metrics.jsonl holds now, read while the run appends: only lines whose newline has landed."""
    path = output / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1] if path.is_file() else []
    return [json.loads(line)["step"] for line in lines]


def _final_weights(output: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final model saved in OUTPUT itself (the checkpoints are in subfolders)."""
    files = [
        p for p in output.rglob("*.safetensors") if not p.relative_to(output).parts[0].startswith(("checkpoint-", "."))
    ]
    assert files, f"no final model in {output}"
    return {f"{p.relative_to(output)}:{name}": t for p in files for name, t in load_file(p).items()}


def test_train_killed_three_times_with_sigkill_resumes_to_the_uninterrupted_weights_and_losses(
    tiny_config, shapes, tmp_path
):
    config = tmp_path / "model_config.json"
    tiny_config.save(config)
    sets = [arg for key, value in TRAIN_SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    # Two datasets sampled 0.7 / 0.3 (training.mixture): the weighted draw must resume exactly too.
    data = ["--data", f"{shapes['train']}:0.7", "--data", f"{shapes['train_captions']}:0.3"]
    args = ["train", "--stage", "instruct", *data, "--image-folder", str(shapes["images"]),
            "--model-config", str(config), "--feature-cache", "none", "--quiet", *sets]  # fmt: skip
    whole = tmp_path / "whole"
    _finish(_start(*args, "--output", str(whole), log=tmp_path / "whole.log"), tmp_path / "whole.log")
    assert [row["step"] for row in _metrics(whole)] == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    # 1. At a random moment after the first checkpoint: in a step, a metrics line or a checkpoint's write.
    log = tmp_path / "run1.log"
    _kill_when(
        _start(*args, "--output", str(out), log=log), lambda: _checkpoints(out), log, random.Random(0).uniform(0, 0.2)
    )
    # 2. Resumed, and killed in the middle of writing a checkpoint (its temporary folder is there: files are
    # being written, fsynced or swapped in).
    log = tmp_path / "run2.log"
    before = _checkpoints(out)[-1]
    _kill_when(
        _start(*args, "--output", str(out), "--resume", log=log),
        # (the folder a kill in the first run may have left is one step on: look past it)
        lambda: any((out / f".checkpoint-{step}.tmp").is_dir() for step in range(before + 2, STEPS + 1)),
        log,
    )
    # 3. Resumed again, and killed just after the metrics line of its second step (the line of the first may be
    # the killed run's, for the step whose checkpoint it did not finish: dropped at the start, the step redone).
    log = tmp_path / "run3.log"
    before = _checkpoints(out)[-1]
    _kill_when(
        _start(*args, "--output", str(out), "--resume", log=log),
        lambda: any(step >= before + 2 for step in _logged_steps(out)),
        log,
    )
    assert not (out / "mllm_config.json").exists()  # no final model yet: every kill was mid-run
    log = tmp_path / "run4.log"
    _finish(_start(*args, "--output", str(out), "--resume", log=log), log)

    assert _metrics(out) == _metrics(whole)  # every step once, with the same loss, lr and gradient norm
    weights, expected = _final_weights(out), _final_weights(whole)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected), [
        name for name in expected if not torch.equal(weights[name], expected[name])
    ]
