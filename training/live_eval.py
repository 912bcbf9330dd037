"""Evaluation while training: every `eval_every` steps, `mllm eval`'s own scorer (`training.evaluate.evaluate`:
greedy answers, VQAv2-normalised exact match, per-type accuracy) on a held-out question file, logged to the
tracker and kept in metrics.jsonl, each step's answers in OUTPUT/eval/step-N.json; with `keep_best`, the
best-scoring model is kept in OUTPUT/best.

    mllm train ... --eval-data data/shapes/val_qa.json --eval-every 50 --eval-limit 200 --keep-best

The answers come from the model being trained, as it is at that step, in eval mode (no dropout): the same
numbers `mllm eval --backend transformers` gives on that step's checkpoint, when the run trains in fp32 (on
a bf16 CPU the frozen LLM is kept in bf16 during training, `training.precision`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mllm.checkpoint import save_pretrained
from training.data import Row
from training.eval_files import read_json_lines
from training.evaluate import evaluate

BEST_DIR = "best"
EVAL_DIR = "eval"
BEST_FILE = "best_score.json"


@dataclass
class LiveEval:
    rows: list[Row]
    """The held-out questions (each row's last answer is the reference)."""
    limit: int | None = None
    """Only the first `limit` rows (a fast signal; the full set is `mllm eval`'s job)."""
    keep_best: bool = False
    """Keep the best-scoring model in OUTPUT/best (an mllm checkpoint, with best_score.json)."""
    max_new_tokens: int = 48
    """Answer length, as `mllm eval`'s default."""

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("--eval-data holds no rows")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"--eval-limit {self.limit} must be > 0")

    def score(self, model, output: Path, step: int) -> dict:
        """`mllm eval`'s summary for the model as it is now, its answers in OUTPUT/eval/step-STEP.json (the
        shape of `mllm eval --output`'s JSON); the model is left in eval mode."""
        model.eval()
        summary, predictions = evaluate(model, self.rows, self.max_new_tokens, self.limit, progress=False)
        path = output / EVAL_DIR / f"step-{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": summary, "predictions": predictions}, indent=2))
        return summary

    def record(self, summary: dict) -> dict:
        """The metrics.jsonl / tracker fields of a summary: overall and per-type accuracy."""
        out = {"eval_accuracy": summary["accuracy"], "eval_questions": summary["questions"]}
        out.update({f"eval_accuracy_{kind}": m["accuracy"] for kind, m in summary["per_type"].items()})
        return out

    @staticmethod
    def best_so_far(metrics_path: Path) -> float | None:
        """The best eval_accuracy a (resumed) run's metrics.jsonl holds already."""
        if not metrics_path.is_file():
            return None
        scores = [r["eval_accuracy"] for r in read_json_lines(metrics_path, appended=True) if "eval_accuracy" in r]
        return max(scores, default=None)

    def keep_if_best(self, model, output: Path, step: int, accuracy: float, best: float | None) -> float | None:
        """Save `model` to OUTPUT/best when `accuracy` beats `best` (ties keep the earlier step); the new best."""
        if not self.keep_best or (best is not None and accuracy <= best):
            return best
        save_pretrained(model, output / BEST_DIR)  # atomic: a kill mid-save keeps the previous best whole
        (output / BEST_DIR / BEST_FILE).write_text(json.dumps({"step": step, "eval_accuracy": accuracy}) + "\n")
        return accuracy
